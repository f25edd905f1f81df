"""The scale-following adapter computes its first layer on ``m / r`` as ``(W m) / r + b`` (the division on the
layer's C/4 outputs rather than on its C inputs, a pass over the activation saved per token): the same map, in
value and in gradient, as the formula written in the module docstring."""

import pytest
import torch
import torch.nn.functional as F

from asqpost import StepAdapter


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
