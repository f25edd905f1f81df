import pytest
import torch

from asqpost import cpp
from asqpost.functional import (
    _fused,
    fake_quantize,
    fake_quantize_reference,
    grad_scale,
    lsq_grad_scale,
    round_ste,
    sum_to_shape,
)
from asqpost.levels import post
from numerics import assert_beyond_rounding

pytestmark = pytest.mark.numerics

SHAPES = [
    ((8, 4, 5, 5), ()),
    ((8, 4, 5, 5), (8, 1, 1, 1)),
    ((6, 4, 3, 3), (6, 1, 1, 1)),
    ((5, 7), (5, 1)),
    ((3, 9, 6), (3, 1, 1)),
    ((3, 9, 6), (3, 9, 1)),
]


def _inputs(shape, step_shape):
    x = (torch.randn(shape, dtype=torch.float64) * 3).requires_grad_()
    step = (torch.rand(step_shape, dtype=torch.float64) * 0.5 + 0.2).requires_grad_()
    return x, step


def test_round_ste_and_grad_scale():
    x = torch.tensor([0.4, 1.6, -2.5], requires_grad=True)
    y = round_ste(x)
    y.sum().backward()
    assert torch.equal(y, torch.round(x.detach()))
    assert torch.equal(x.grad, torch.ones(3))
    s = torch.tensor(2.0, requires_grad=True)
    out = grad_scale(s, 0.25)
    out.backward()
    assert out.item() == 2.0 and s.grad.item() == 0.25


@pytest.mark.parametrize(("shape", "step_shape"), SHAPES)
@pytest.mark.parametrize(("lo", "hi"), [(-8, 7), (0, 15), (-2, 1)])
def test_fused_equals_plain_autograd(shape, step_shape, lo, hi):
    x, step = _inputs(shape, step_shape)
    g = torch.randn(shape, dtype=torch.float64)
    y = fake_quantize(x, step, lo, hi)
    gx, gs = torch.autograd.grad(y, (x, step), g)
    y_ref = fake_quantize_reference(x, step, lo, hi)
    gx_ref, gs_ref = torch.autograd.grad(y_ref, (x, step), g)
    assert torch.equal(y, y_ref)
    assert torch.allclose(gx, gx_ref, rtol=1e-14, atol=0)  # plain autograd computes (g * s) / s
    assert torch.allclose(gs, gs_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("shape", "step_shape"), SHAPES[:3])
def test_step_gradient_matches_lsq_formula(shape, step_shape):
    """dx_hat/ds = round(v) - v inside, qmin below, qmax above (Esser et al. 2020, eq. 3)."""
    lo, hi = -4, 3
    x, step = _inputs(shape, step_shape)
    y = fake_quantize(x, step, lo, hi)
    gx, gs = torch.autograd.grad(y.sum(), (x, step))
    v = x.detach() / step.detach()
    per_elem = torch.where(v < lo, torch.full_like(v, lo), torch.where(v > hi, torch.full_like(v, hi), v.round() - v))
    assert torch.allclose(gs, sum_to_shape(per_elem, step.shape), atol=1e-12)
    inside = (v >= lo) & (v <= hi)
    assert torch.equal(gx, inside.to(gx.dtype))  # STE: 1 inside, 0 outside
    assert inside.any() and (~inside).any()


def test_forward_values_are_on_the_grid():
    x = torch.randn(1000, dtype=torch.float64) * 5
    step = torch.tensor(0.3, dtype=torch.float64)
    y = fake_quantize(x, step, -8, 7)
    codes = y / step
    assert torch.allclose(codes, codes.round(), atol=1e-9)
    assert codes.round().min() == -8 and codes.round().max() == 7


def test_level_set_rounder():
    levels = post(4)
    x = torch.randn(64, 9, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(64, 1, dtype=torch.float64).add(0.5).requires_grad_()
    y = fake_quantize(x, alpha, -1, 1, levels.project)
    y_ref = fake_quantize_reference(x, alpha, -1, 1, levels.project)
    assert torch.equal(y, y_ref)
    ga = torch.autograd.grad(y.sum(), alpha)[0]
    ga_ref = torch.autograd.grad(y_ref.sum(), alpha)[0]
    assert torch.allclose(ga, ga_ref, atol=1e-12)
    normalised = (y / alpha).detach()
    assert torch.allclose(levels.project(normalised), normalised, rtol=1e-15, atol=0)


def test_lsq_grad_scale_value():
    assert lsq_grad_scale(100, 4) == pytest.approx(1 / 20)


needs_extension = pytest.mark.skipif(not cpp.available(), reason="the C++ extension could not be built here")
ROW_STEPS = [((8, 4, 5, 5), ()), ((8, 4, 5, 5), (8, 1, 1, 1)), ((5, 7), (5, 1)), ((3, 9, 6), (3, 9, 1))]


def _float32_inputs(shape, step_shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 3).requires_grad_()
    step = (torch.rand(step_shape, generator=generator) * 0.5 + 0.2).requires_grad_()
    return x, step, torch.randn(shape, generator=generator)


@needs_extension
@pytest.mark.parametrize(("shape", "step_shape"), ROW_STEPS)
@pytest.mark.parametrize("levels", [None, post(4)], ids=["integer", "post"])
def test_the_fused_native_pass_gives_the_torch_composite_bits(shape, step_shape, levels):
    """Forward and x gradient: the same float32 operations, the same bits; the step gradient is summed in float64
    (torch sums in float32), so it is compared with a float64 computation of the same sum."""
    lo, hi = (-1, 1) if levels is not None else (-8, 7)
    x, step, g = _float32_inputs(shape, step_shape)
    assert _fused(x, step) is not None
    y = fake_quantize(x, step, lo, hi, levels=levels)
    gx, gs = torch.autograd.grad(y, (x, step), g)
    y_torch = fake_quantize(x, step, lo, hi, levels=levels, fused=False)
    gx_torch, gs_torch = torch.autograd.grad(y_torch, (x, step), g)
    assert torch.equal(y, y_torch) and torch.equal(gx, gx_torch)
    v = x.detach() / step.detach()
    rounder = torch.round if levels is None else levels.project
    inside = ((v >= lo) & (v <= hi)).float()
    terms = (g * rounder(v.clamp(lo, hi)) - (g * inside) * v).double()
    exact = sum_to_shape(terms, step.shape)
    assert torch.allclose(gs.double(), exact, rtol=1e-6, atol=1e-6 * exact.abs().max().item())
    assert_beyond_rounding(gs_torch * 1.01, gs)  # the bound can fail


@needs_extension
def test_the_fused_pass_does_not_depend_on_the_thread_count():
    x, step, g = _float32_inputs((4, 50000), ())  # one step for 200000 elements: several pieces
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grads.append(torch.autograd.grad(fake_quantize(x, step, -8, 7), (x, step), g))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@needs_extension
def test_the_fused_pass_keeps_nan_and_infinities_as_torch_does():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.5, 2.0]], requires_grad=True)
    step = torch.tensor(0.25, requires_grad=True)
    for levels, (lo, hi) in ((None, (-8.0, 7.0)), (post(3), (-1.0, 1.0))):
        fused, plain = (fake_quantize(x, step, lo, hi, levels=levels, fused=f) for f in (True, False))
        assert torch.equal(torch.isnan(fused), torch.isnan(plain))
        assert torch.equal(fused[~torch.isnan(fused)], plain[~torch.isnan(plain)])


def test_steps_that_are_not_one_per_row_take_the_torch_ops():
    x = torch.randn(4, 6)
    assert _fused(x, torch.ones(6)) is None  # one per column
    assert _fused(x, torch.ones(1, 6)) is None
    assert _fused(x.t(), torch.ones(6, 1)) is None  # not contiguous
    assert _fused(x.double(), torch.ones(4, 1, dtype=torch.float64)) is None


@needs_extension
@pytest.mark.parametrize("shape", [(4, 8, 5, 7), (2, 16, 32, 32)])
def test_the_adapters_plane_means_backward_gives_torchs_bits(shape):
    from asqpost.adapters import _PlaneMeans

    x = torch.randn(shape, requires_grad=True)
    x.data[0, 0, 0, :3] = torch.tensor([0.0, -0.0, float("nan")])
    g_mean, g_abs = torch.randn(shape[:2]), torch.randn(shape[:2])
    means, abs_means = _PlaneMeans.apply(x)
    grad = torch.autograd.grad((means * g_mean).sum() + (abs_means * g_abs).sum(), x)[0]
    torch_means, torch_abs = x.mean(dim=(2, 3)), x.abs().mean(dim=(2, 3))
    torch_grad = torch.autograd.grad((torch_means * g_mean).sum() + (torch_abs * g_abs).sum(), x)[0]
    assert torch.equal(means, torch_means) or torch.isnan(means).any()
    assert torch.equal(grad, torch_grad)
    only_abs = torch.autograd.grad(_PlaneMeans.apply(x)[1].sum(), x)[0]
    assert torch.equal(only_abs, torch.autograd.grad(x.abs().mean(dim=(2, 3)).sum(), x)[0])
