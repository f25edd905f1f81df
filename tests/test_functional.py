import pytest
import torch

from asqpost.functional import (
    fake_quantize,
    fake_quantize_reference,
    grad_scale,
    lsq_grad_scale,
    round_ste,
    sum_to_shape,
)
from asqpost.levels import post

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
