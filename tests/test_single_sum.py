"""Single-sum export mode: POST levels rounded onto an int8 grid (one integer sum per weight instead of two)."""

import pytest
import torch
from torch import nn

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.export import convert_to_packed, integer_lut, load_packed, save_packed
from asqpost.kernels import NativePlan, extension
from asqpost.levels import make_levels
from asqpost.packed.lut import INT8_PEAK, needs_single_sum, single_sum_table

pytestmark = pytest.mark.numerics


@pytest.mark.parametrize("bits", [3, 4, 5, 8])
def test_single_sum_table_is_an_int8_grid_within_half_a_step(bits):
    table = make_levels("post", bits).table(dtype=torch.float64) * 0.37
    assert needs_single_sum(table)
    grid, factor = single_sum_table(table)
    lut = integer_lut(grid)
    assert lut is not None and not lut.has_odd and lut.unit == 1 / 128
    assert int(lut.even.abs().max()) == INT8_PEAK
    peak = float(table.abs().max())
    assert factor == pytest.approx(peak * 128 / 127, rel=1e-15)
    assert (grid * factor - table).abs().max() <= peak / (2 * INT8_PEAK) * (1 + 1e-12)
    assert (torch.sign(grid) * torch.sign(table) >= 0).all(), "no level changes sign (tiny ones may become 0)"


@pytest.mark.parametrize("grid", ["uniform", "pot"])
def test_one_sum_grids_are_left_alone(grid):
    assert not needs_single_sum(make_levels(grid, 4).table(dtype=torch.float64))


def test_single_sum_table_refuses_an_all_zero_table():
    with pytest.raises(ValueError, match="non-zero"):
        single_sum_table(torch.zeros(3, dtype=torch.float64))


def _post_model(recipe="post-asq", bits=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 6))
    q = prepare_qat(model, QATConfig.recipe(recipe, bits, first=None, last=None)).eval()
    x = torch.randn(8, 5, 24)
    calibrate(q, [x])
    return q, x


def test_single_sum_packs_post_into_one_sum_close_to_the_exact_packing(tmp_path):
    q, x = _post_model()
    exact, single = convert_to_packed(q), convert_to_packed(q, single_sum=True)
    for index in (0, 2):
        e, s = exact[index].weight, single[index].weight
        assert e.lut().has_odd and not s.lut().has_odd
        assert torch.equal(e.codes, s.codes), "the codes stay; only the table and the scales change"
        peak_step = e.scale * float(e.table.abs().max())  # per output channel
        moved = (s.dequantize(torch.float64) - e.dequantize(torch.float64)).abs().amax(dim=1)
        assert (moved <= peak_step.double() / (2 * INT8_PEAK) * (1 + 1e-5)).all()
        if extension.available():
            plan = single[index].plans.plan("native")
            assert isinstance(plan, NativePlan) and not plan.has_odd
    with torch.no_grad():
        y_exact, y_single = exact(x), single(x)
        assert not torch.equal(y_exact, y_single)
        cos = torch.nn.functional.cosine_similarity(y_exact.flatten(), y_single.flatten(), dim=0)
        assert cos > 0.999
        save_packed(single, tmp_path / "m.safetensors")
        assert torch.equal(load_packed(tmp_path / "m.safetensors", model=_post_model()[0])(x), y_single)


def test_single_sum_keeps_one_sum_grids_exact():
    q, x = _post_model("lsq-lsq")
    exact, single = convert_to_packed(q), convert_to_packed(q, single_sum=True)
    with torch.no_grad():
        assert torch.equal(exact(x), single(x))
    for index in (0, 2):
        assert torch.equal(exact[index].weight.table, single[index].weight.table)
        assert torch.equal(exact[index].weight.scale, single[index].weight.scale)
