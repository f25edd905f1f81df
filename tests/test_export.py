import json

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from asqpost import QATConfig, StepAdapter, calibrate, prepare_qat
from asqpost.config import recipe_names
from asqpost.export import (
    ExportError,
    PackedConv2d,
    PackedLinear,
    convert_to_packed,
    integer_lut,
    load_packed,
    pack_codes,
    packed_nbytes,
    read_export,
    save_packed,
    unpack_codes,
)
from asqpost.export.format import VERSION, _digest
from asqpost.kernels.reference import integer_accumulators, reference_plan
from asqpost.levels import GRIDS, make_levels
from asqpost.models import create_model

pytestmark = pytest.mark.numerics

RECIPES = recipe_names()  # every registered weight method with every registered activation method


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 3, 7, 8, 9, 31, 1000, 1001])
def test_pack_round_trip(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits)
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_round_trip_fuzz(bits, data):
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=200))
    codes = torch.tensor(values, dtype=torch.int64)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, len(values)), codes)


def test_pack_rejects_out_of_range_and_wrong_sizes():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([16]), 4)
    with pytest.raises(ValueError, match="need"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 9)


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_integer_lut_is_exact(grid, bits):
    table = make_levels(grid, bits).table(dtype=torch.float64)
    lut = integer_lut(table)
    assert lut is not None
    assert torch.equal(lut.values(), table)
    exact_post = grid == "post" or (grid == "post_int8" and bits >= 5)  # no int8 lattice separates 5-bit POST
    if exact_post and bits >= 3:
        assert lut.has_odd  # odd powers of sqrt 2 go to the second accumulator
        assert lut.unit == 2.0 ** -((2 ** (bits - 1) - 2) // 2)
    else:
        assert not lut.has_odd


def _layers():
    return [
        nn.Conv2d(6, 8, 3, padding=1),
        nn.Conv2d(6, 9, 3, stride=2, padding=2, dilation=2, groups=3, bias=False),
        nn.Conv2d(6, 6, 3, padding=1, groups=6),
        nn.Linear(6, 5),
    ]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("index", range(4))
def test_packed_layer_equals_fake_quant_layer(recipe, bits, index):
    layer = _layers()[index]
    model = nn.Sequential(layer)
    q = prepare_qat(model, QATConfig.recipe(recipe, bits, first=None, last=None)).eval()
    x = torch.rand(5, 6, 9, 9) * 3 if index < 3 else torch.rand(5, 7, 6) * 3  # linear on tokens (N, T, C)
    calibrate(q, [x])
    packed = convert_to_packed(q)
    assert isinstance(packed[0], PackedConv2d if index < 3 else PackedLinear)
    with torch.no_grad():
        expected = q(x).double()
        got = packed(x).double()
        # the exact integer path against the same maths written directly
        x_int, step = packed[0].input_quant(x)
        w = packed[0].weight.dequantize(torch.float64)
        direct = packed[0].geometry.apply(
            x_int.double() * step.double(), w, None if layer.bias is None else layer.bias.double()
        )
    assert torch.allclose(got, direct, rtol=1e-6, atol=1e-7)  # exact sums, one float32 rounding at the end
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_accumulators_are_integers():
    q = prepare_qat(nn.Sequential(nn.Linear(16, 4)), QATConfig.recipe("post-asq", 4, first=None, last=None))
    x = torch.rand(3, 16)
    calibrate(q, [x])
    layer = convert_to_packed(q)[0]
    x_int, _ = layer.input_quant(x)
    even, odd = integer_accumulators(reference_plan(layer.spec(), x.device), x_int)
    assert torch.equal(even, even.round()) and odd is not None and torch.equal(odd, odd.round())


def _sqnr(ref, out):
    return 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp_min(1e-30))


@pytest.mark.parametrize(
    ("name", "shape"), [("resnet20", (1, 16, 16)), ("transformer", (8, 12)), ("smallcnn", (1, 12, 12))]
)
@pytest.mark.parametrize("recipe", ["post-asq", "lsq-lsq", "apot-lsq"])
def test_packed_model_matches_fake_quant(name, shape, recipe, tmp_path):
    model = create_model(name, 10, shape)
    q = prepare_qat(model, QATConfig.recipe(recipe, 4)).eval()
    x = torch.randn(16, *shape)
    calibrate(q, [x])
    packed = convert_to_packed(q)
    with torch.no_grad():
        ref, out = q(x), packed(x)
    assert _sqnr(ref, out) > 30
    spec = {"name": name, "num_classes": 10, "input_shape": list(shape), "kwargs": {}}
    size = save_packed(packed, tmp_path / "m.safetensors", spec)
    loaded = load_packed(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    if name == "resnet20":
        assert size < float_bytes / 4


@pytest.fixture
def export_file(tmp_path):
    model = create_model("smallcnn", 4, (1, 12, 12), width=8)
    q = prepare_qat(model, QATConfig.recipe("post-asq", 3, act={"adapter_form": "paper"})).eval()
    calibrate(q, [torch.randn(8, 1, 12, 12)])
    path = tmp_path / "m.safetensors"
    save_packed(
        convert_to_packed(q),
        path,
        {"name": "smallcnn", "num_classes": 4, "input_shape": [1, 12, 12], "kwargs": {"width": 8}},
    )
    return path


def _rewrite_meta(path, change, reseal=True):
    """Edit the metadata; ``reseal`` recomputes the checksum (a consistent file that another check must catch)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["asqpost"])
    change(meta)
    if reseal:
        meta["sha256"] = _digest(safetensors.torch.load(raw), meta)
    header["__metadata__"]["asqpost"] = json.dumps(meta)
    body = json.dumps(header).encode()
    body += b" " * ((-len(body)) % 8)
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])


def test_corrupt_exports_are_refused(export_file, tmp_path):
    raw = export_file.read_bytes()
    cases = {
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "garbage": b"\x00" * 64,
        "data byte flipped": raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:],
    }
    for what, data in cases.items():
        bad = tmp_path / f"{what}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(ExportError):
            load_packed(bad)
    with pytest.raises(ExportError, match="does not exist"):
        load_packed(tmp_path / "missing.safetensors")


def test_metadata_edits_are_refused(export_file):
    def edit(meta):
        name = next(iter(meta["layers"]))
        meta["layers"][name]["input"]["qmax"] -= 1

    _rewrite_meta(export_file, edit, reseal=False)
    with pytest.raises(ExportError, match="checksum"):
        read_export(export_file)


def test_geometry_that_does_not_fit_the_model_is_refused(export_file):
    def edit(meta):
        geometry = next(m["geometry"] for m in meta["layers"].values() if m["kind"] == "conv2d")
        geometry["stride"] = [2, 2]

    _rewrite_meta(export_file, edit)
    with pytest.raises(ExportError, match=r"fit the model.*stride"):
        load_packed(export_file)


def test_bad_version_and_mismatched_model(export_file):
    _rewrite_meta(export_file, lambda m: m.update(version=99))
    with pytest.raises(ExportError, match="version 99"):
        read_export(export_file)
    _rewrite_meta(export_file, lambda m: m.update(version=VERSION, model={**m["model"], "kwargs": {"width": 16}}))
    with pytest.raises(ExportError, match="tensor"):
        load_packed(export_file)
    with pytest.raises(ExportError, match="fit the model"):
        load_packed(export_file, model=create_model("mlp", 4, (1, 12, 12)))


def test_export_refuses_uncalibrated_and_float():
    q = prepare_qat(create_model("smallcnn", 4, (1, 12, 12)), QATConfig.recipe("post-asq", 3))
    with pytest.raises(ValueError, match="not calibrated"):
        convert_to_packed(q)
    with pytest.raises(ValueError, match="no quantized layers"):
        convert_to_packed(create_model("smallcnn", 4, (1, 12, 12)))


def _scale_asq(bits=4, per_token=False):
    return QATConfig.recipe(
        "post-asq", bits, act={"adapter_form": "scale", "per_token": per_token}, first=None, last=None
    )


def _gains(n, dims):
    """One input gain per sample, 0.25 .. 4, so the scale-following beta differs between samples."""
    return torch.logspace(-2, 2, n, base=2).reshape((n,) + (1,) * dims)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(("index", "per_token"), [(0, False), (1, False), (3, False), (3, True)])
def test_packed_scale_adapter_equals_fake_quant(bits, index, per_token):
    layer = _layers()[index]
    q = prepare_qat(nn.Sequential(layer), _scale_asq(bits, per_token)).eval()
    x = torch.rand(6, 6, 9, 9) * _gains(6, 3) if index < 3 else torch.rand(6, 7, 6) * _gains(6, 2)
    calibrate(q, [x])
    with torch.no_grad():
        q[0].input_quantizer.adapter.gamma.fill_(0.9)  # a trained-looking gamma travels too
    packed = convert_to_packed(q)
    quantizer, packed_input = q[0].input_quantizer, packed[0].input_quant
    assert packed_input.adapter.form == "scale" and packed_input.meta()["adapter"]["form"] == "scale"
    assert packed_input.adapter.r_ref.item() == quantizer.adapter.r_ref.item() != 1.0
    with torch.no_grad():
        step = packed_input.step_of(x)
        assert torch.equal(step, quantizer.step * quantizer.beta(x))
        assert step.reshape(-1).std() > 0.1 * step.mean()  # per-sample steps that follow the gains
        expected, got = q(x).double(), packed(x).double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def test_scale_adapter_export_round_trip(tmp_path):
    q = prepare_qat(create_model("smallcnn", 4, (1, 12, 12), width=8), _scale_asq(3)).eval()
    x = torch.randn(8, 1, 12, 12) * _gains(8, 3)
    calibrate(q, [x])
    packed = convert_to_packed(q)
    spec = {"name": "smallcnn", "num_classes": 4, "input_shape": [1, 12, 12], "kwargs": {"width": 8}}
    save_packed(packed, tmp_path / "m.safetensors", spec)
    meta, _ = read_export(tmp_path / "m.safetensors")
    forms = {layer["input"]["adapter"]["form"] for layer in meta["layers"].values() if layer["input"]["adapter"]}
    assert forms == {"scale"}
    loaded = load_packed(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))
        assert torch.allclose(packed(x), q(x), rtol=1e-4, atol=1e-4)


def test_exports_without_an_adapter_form_load_as_the_paper_adapter(export_file):
    """Exports written before the scale form have no ``form`` in their adapter metadata."""
    before = load_packed(export_file)

    def drop_form(meta):
        for layer in meta["layers"].values():
            adapter = layer["input"] and layer["input"]["adapter"]
            if adapter:
                assert adapter.pop("form") == "paper"

    _rewrite_meta(export_file, drop_form)
    old = load_packed(export_file)
    adapters = [m for m in old.modules() if isinstance(m, StepAdapter)]
    assert adapters and all(a.form == "paper" for a in adapters)
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(old(x), before(x))
