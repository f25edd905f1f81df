"""Hypothesis fuzzing: quantizers on random shapes, bits and values; the export loader on random byte edits."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asqpost import QATConfig, QuantizerConfig, build_quantizer, calibrate, prepare_qat
from asqpost.export import ExportError, convert_to_packed, load_packed, save_packed
from asqpost.models import create_model

pytestmark = pytest.mark.reliability("fuzz")


@settings(max_examples=80, deadline=None)
@given(
    grid=st.sampled_from(["lsq", "uniform", "pot", "post", "apot"]),
    bits=st.integers(2, 8),
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    scale=st.floats(1e-4, 1e4),
)
def test_weight_quantizers_stay_finite_and_on_grid(grid, bits, shape, scale):
    w = torch.randn(shape) * scale
    q = build_quantizer(QuantizerConfig(grid, bits), "weight", weight_shape=w.shape).calibrate_(w)
    w_hat = q(w * 3)
    assert w_hat.shape == w.shape and torch.isfinite(w_hat).all()
    if grid != "lsq":
        normalised = (w_hat / q.scale).double()
        assert torch.allclose(q.levels.project(normalised), normalised, atol=1e-6)
    else:
        codes = w_hat / q.scale
        assert torch.allclose(codes, codes.round(), atol=1e-3)


PROBE = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def export_file(tmp_path_factory):
    """An export's bytes and the outputs its loaded model gives on ``PROBE``."""
    model = create_model("mlp", 3, (1, 4, 4), hidden=8)
    q = prepare_qat(model, QATConfig.recipe("post-asq", 3)).eval()
    calibrate(q, [torch.rand(4, 1, 4, 4)])
    path = tmp_path_factory.mktemp("export") / "m.safetensors"
    save_packed(
        convert_to_packed(q), path, {"name": "mlp", "num_classes": 3, "input_shape": [1, 4, 4], "kwargs": {"hidden": 8}}
    )
    with torch.no_grad():
        return path.read_bytes(), load_packed(path)(PROBE)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_export_loader_survives_random_byte_edits(export_file, tmp_path, data):
    original, expected = export_file
    raw = bytearray(original)
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), min_size=1, max_size=8))
    for pos, value in edits:
        raw[pos] = value
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(bytes(raw[:cut] if cut is not None else raw))
    try:
        model = load_packed(path)
    except ExportError as err:  # refused, saying which file and why
        assert str(path) in str(err)
        return
    # an edit that loads (header whitespace, or no change at all) gives exactly the original's outputs
    with torch.no_grad():
        assert torch.equal(model(PROBE), expected)


def test_whitespace_added_to_the_header_loads_with_the_same_outputs(export_file, tmp_path):
    original, expected = export_file
    n = int.from_bytes(original[:8], "little")
    header = original[8 : 8 + n] + b"\n\t \r\n\t \n"  # JSON whitespace; the header stays 8-byte aligned
    path = tmp_path / "spaced.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + original[8 + n :])
    with torch.no_grad():
        assert torch.equal(load_packed(path)(PROBE), expected)
