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


@pytest.fixture(scope="module")
def export_bytes(tmp_path_factory):
    model = create_model("mlp", 3, (1, 4, 4), hidden=8)
    q = prepare_qat(model, QATConfig.recipe("post-asq", 3)).eval()
    calibrate(q, [torch.rand(4, 1, 4, 4)])
    path = tmp_path_factory.mktemp("export") / "m.safetensors"
    save_packed(
        convert_to_packed(q), path, {"name": "mlp", "num_classes": 3, "input_shape": [1, 4, 4], "kwargs": {"hidden": 8}}
    )
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_export_loader_survives_random_byte_edits(export_bytes, tmp_path, data):
    raw = bytearray(export_bytes)
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), min_size=1, max_size=8))
    for pos, value in edits:
        raw[pos] = value
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    blob = bytes(raw[:cut] if cut is not None else raw)
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(blob)
    if blob == export_bytes:
        load_packed(path)
        return
    try:
        model = load_packed(path)
    except ExportError:
        return
    # an edit that loads must not have changed anything that matters (e.g. header whitespace)
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 1, 4, 4))).all()
