"""Eval-mode weight projections are computed once and reused until the weight or the scale changes."""

import copy

import pytest
import torch
from torch import nn

from asqpost import QATConfig, calibrate, prepare_qat

pytestmark = pytest.mark.numerics


def _model(recipe: str) -> tuple[nn.Module, torch.Tensor]:
    q = prepare_qat(nn.Sequential(nn.Linear(16, 8)), QATConfig.recipe(recipe, 4, first=None, last=None)).eval()
    x = torch.randn(5, 16)
    calibrate(q, [x])
    return q, x


def _counting(quantizer) -> list[int]:
    """Counts the projections ``quantizer`` computes (its ``quantize`` calls)."""
    calls = [0]
    quantize = quantizer.quantize

    def counted(w):
        calls[0] += 1
        return quantize(w)

    quantizer.quantize = counted
    return calls


def _fresh(layer) -> torch.Tensor:
    """The layer's projected weight computed now, without any cache."""
    with torch.no_grad():
        return type(layer.weight_quantizer).quantize(layer.weight_quantizer, layer.weight)


RECIPES = ["post-asq", "lsq-lsq", "apot-lsq"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_eval_projects_the_weight_once(recipe):
    q, x = _model(recipe)
    layer = q[0]
    calls = _counting(layer.weight_quantizer)
    with torch.no_grad():
        first, second = layer.weight_quantizer(layer.weight), layer.weight_quantizer(layer.weight)
        y1, y2 = q(x), q(x)
    assert calls[0] == 1 and second is first
    assert torch.equal(first, _fresh(layer))
    assert torch.equal(y1, y2)
    with torch.inference_mode():  # a mode of its own: one projection, reused within it
        q(x), q(x)
    assert calls[0] == 2


def _edit_weight(q):
    with torch.no_grad():
        q[0].weight.add_(0.05)


def _edit_scale(q):
    with torch.no_grad():
        q[0].weight_quantizer.raw_scale.mul_(1.5)


def _load_other_state(q):
    other = copy.deepcopy(q)
    with torch.no_grad():
        other[0].weight.mul_(-1)
        other[0].weight_quantizer.raw_scale.mul_(0.5)
    q.load_state_dict(other.state_dict())


def _replace_weight(q):
    q[0].weight = nn.Parameter(q[0].weight.detach() * 2)


def _to_float64(q):
    q.to(torch.float64)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("change", [_edit_weight, _edit_scale, _load_other_state, _replace_weight, _to_float64])
def test_a_change_of_weight_or_scale_invalidates_the_projection(recipe, change):
    q, x = _model(recipe)
    layer = q[0]
    with torch.no_grad():
        before = layer.weight_quantizer(layer.weight)
    change(q)
    with torch.no_grad():
        after = layer.weight_quantizer(layer.weight)
        assert torch.equal(after, _fresh(layer))
        assert not torch.equal(after.double(), before.double())
        assert torch.equal(q(x.to(after.dtype)), q(x.to(after.dtype)))


def test_train_mode_clears_the_projection_and_computes_every_call():
    q, x = _model("post-asq")
    calls = _counting(q[0].weight_quantizer)
    with torch.no_grad():
        q(x)
    q.train()
    with torch.no_grad():
        q(x), q(x)
    assert calls[0] == 3
    q.eval()
    with torch.no_grad():
        q(x), q(x)
    assert calls[0] == 4


@pytest.mark.parametrize("train", [True, False])
def test_gradients_are_those_of_an_uncached_model(train):
    q, x = _model("post-asq")
    reference = copy.deepcopy(q)  # never projected in eval: nothing cached
    with torch.no_grad():
        q(x)  # the eval-mode projection is held now
    grads = []
    for model in (q, reference):
        model.train(train)
        model.zero_grad()
        model(x).square().sum().backward()
        layer = model[0]
        grads.append((layer.weight.grad.clone(), layer.weight_quantizer.raw_scale.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][0].abs().sum() > 0


def test_copies_do_not_carry_the_projection():
    q, x = _model("post-asq")
    with torch.no_grad():
        y = q(x)
    assert q[0].weight_quantizer._projection._output is not None
    copied = copy.deepcopy(q)
    assert copied[0].weight_quantizer._projection._output is None
    with torch.no_grad():
        assert torch.equal(copied(x), y)
