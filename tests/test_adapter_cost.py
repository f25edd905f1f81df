"""The scale-following adapter computes its first layer on ``m / r`` as ``(W m) / r + b`` (the division on the
layer's C/4 outputs rather than on its C inputs, a pass over the activation saved per token): the same map, in
value and in gradient, as the formula written in the module docstring."""

import pytest
import torch
import torch.nn.functional as F

from asqpost import StepAdapter
from asqpost.masking import token_mask

pytestmark = pytest.mark.numerics


def _formula(adapter: StepAdapter, x: torch.Tensor) -> torch.Tensor:
    """``beta = (r / r_ref) ** gamma * positive(mlp(m / r))``, written as the docstring reads."""
    r = adapter.input_scale(x)
    z = adapter.statistics(x) / r
    if adapter.hidden is not None:
        z = torch.relu(F.linear(z, adapter.hidden.weight, adapter.hidden.bias))
    beta = (r / adapter.r_ref) ** adapter.gamma * F.softplus(F.linear(z, adapter.out.weight, adapter.out.bias))
    return beta.reshape(beta.shape + (1,) * (x.dim() - beta.dim()))


@pytest.mark.parametrize(
    ("channels", "shape", "per_token"),
    [
        (16, (4, 16, 3, 3), False),
        (16, (4, 16), False),
        (16, (4, 5, 16), False),
        (16, (4, 5, 16), True),
        (6, (4, 5, 6), True),  # C < 8: a single C -> 1 layer, folded the same way
    ],
)
def test_folded_first_layer_is_the_formula_in_value_and_gradient(channels, shape, per_token):
    torch.manual_seed(0)
    adapter = StepAdapter(channels, per_token=per_token, form="scale").double()
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # a trained-looking adapter: every parameter matters
        adapter.gamma.fill_(0.7)
        adapter.r_ref.fill_(1.3)
    x = (torch.randn(shape, dtype=torch.float64) * 2).requires_grad_()
    params = [x, *adapter.parameters()]
    weights = torch.randn(adapter(x).shape, dtype=torch.float64)  # a loss that weighs each beta differently

    beta = adapter(x)
    grads = torch.autograd.grad((beta * weights).sum(), params)
    expected = _formula(adapter, x)
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)

    assert beta.std() > 0.01, "each sample (or token) has its own beta"
    assert torch.allclose(beta, expected, rtol=1e-12, atol=0)
    for grad, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(grad, want, rtol=1e-9, atol=1e-12)


def _padded(x: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` followed by ``extra`` garbage tokens (huge, negative, one inf), and the mask of the real tokens."""
    garbage = 50 * torch.randn(x.shape[0], extra, x.shape[2], dtype=x.dtype) - 20
    garbage[0, 0, 0] = float("inf")
    keep = torch.cat([torch.ones(x.shape[:2]), torch.zeros(x.shape[0], extra)], dim=1).bool()
    keep[1, 2] = False  # a hole inside a sample too
    return torch.cat([x, garbage], dim=1), keep


@pytest.mark.parametrize("grad", [False, True])
def test_one_masked_copy_gives_the_statistics_and_scale_bit_for_bit(grad):
    """Under a token mask the scale adapter takes both statistics from one masked copy of ``x`` (abs in place
    where autograd allows): the same bits as ``statistics`` and ``input_scale``, and the same gradients."""
    torch.manual_seed(1)
    adapter = StepAdapter(16, form="scale")
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x, keep = _padded(torch.randn(3, 6, 16) * 2, 3)
    x.requires_grad_(grad)
    with token_mask(keep):
        means, r = adapter._statistics_and_scale(x)
        assert torch.equal(means, adapter.statistics(x)) and torch.equal(r, adapter.input_scale(x))
        assert torch.isfinite(means).all() and torch.isfinite(r).all(), "padding, inf included, stays out"
        beta = adapter(x)
        expected = _formula(adapter, x)
    assert torch.allclose(beta, expected, rtol=1e-6, atol=0)
    if grad:
        (got,) = torch.autograd.grad(beta.sum(), x)
        (want,) = torch.autograd.grad(expected.sum(), x)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)  # float32: the fold rounds differently
        assert torch.equal(got[~keep], torch.zeros_like(got[~keep])), "padding gets no gradient"
