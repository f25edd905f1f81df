"""Packed == fake quant, stated exactly: fed the same input, every packed layer of a transformer makes the same
activation codes and the same step ``s * beta`` as its fake-quant layer, bit for bit, and their outputs differ by
no more than float32 rounding of the fake-quant layer's dot products can explain.

End to end the two models drift apart further (``benchmarks/packed_fidelity.py``): a rounding difference moves a
value across a rounding boundary of the next layer's quantizer, that code differs by a whole step, and the flips
multiply from layer to layer, as they do between the fake-quant model in float32 and in float64.
"""

import pytest
import torch
import torch.nn.functional as F

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.convert import quant_layers
from asqpost.export import convert_to_packed
from asqpost.export.modules import PackedLayer
from asqpost.masking import token_mask
from tiny_bert import tiny_bert_config

pytestmark = pytest.mark.numerics

transformers = pytest.importorskip("transformers")

UNIT_ROUNDOFF = 2.0**-24  # float32


def _tiny_bert() -> torch.nn.Module:
    config = tiny_bert_config(transformers)
    return transformers.BertModel(config).eval()


def _padded_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _layer_inputs(packed: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """Each packed layer's input in a forward of the packed model."""
    seen: dict[str, torch.Tensor] = {}
    layers = {name: m for name, m in packed.named_modules() if isinstance(m, PackedLayer)}
    hooks = [
        m.register_forward_hook(lambda m, inputs, out, name=name: seen.__setitem__(name, inputs[0].detach()))
        for name, m in layers.items()
    ]
    with torch.no_grad():
        packed(**batch)
    for hook in hooks:
        hook.remove()
    assert set(seen) == set(layers)
    return seen


def _fake_quant_codes(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = layer.input_quantizer
    step = q.scaled_step(x) * q.beta(x) if hasattr(q, "adapter") else q.scaled_step(x)
    return torch.clamp(torch.round(x / step), *q.qrange), step


def _rounding_bound(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Worst-case float32 rounding of the fake-quant layer: ``(K + 8) u (|x_hat| . |w_hat| + |b|)`` per output,
    K the fan-in (a dot product of K terms, the bias, the products x_int * s and level * scale, and the packed
    layer's own final rounding, each at most a few units ``u`` of the sum of magnitudes)."""
    x_hat = layer.input_quantizer(x).double().abs()
    w_hat = layer.quantized_weight().double().abs()
    bias = 0.0 if layer.bias is None else layer.bias.double().abs()
    return (layer.in_features + 8) * UNIT_ROUNDOFF * (F.linear(x_hat, w_hat) + bias)


@pytest.mark.parametrize(
    ("recipe", "act"),
    [("lsq-lsq", {}), ("post-asq", {}), ("post-asq", {"per_token": True}), ("post-asq", {"adapter_form": "paper"})],
)
def test_each_packed_layer_is_its_fake_quant_layer_within_float_rounding(recipe, act):
    """Every Linear of a tiny BERT (first and last at 8 bits, the rest W4A8), inputs from a padded batch."""
    torch.manual_seed(0)
    config = QATConfig.recipe(recipe, 4, act={"bits": 8, **act})
    qat = prepare_qat(_tiny_bert(), config).eval()
    calibrate(qat, [_padded_batch() for _ in range(2)])
    if act.get("adapter_form") != "paper" and recipe == "post-asq":
        with torch.no_grad():  # trained-looking adapters: beta depends on the input
            for _, layer in quant_layers(qat):
                if hasattr(layer.input_quantizer, "adapter"):
                    layer.input_quantizer.adapter.out.weight.normal_(std=0.3)
    packed = convert_to_packed(qat)
    batch = _padded_batch()
    inputs = _layer_inputs(packed, batch)
    fake_layers = dict(quant_layers(qat))
    paths = set()
    with torch.no_grad(), token_mask(batch["attention_mask"]):
        for name, x in inputs.items():
            p, q = packed.get_submodule(name), fake_layers[name]
            paths.add(p.plans.describe(torch.device("cpu"))[0])
            codes, step = p.input_quant(x)
            fake_codes, fake_step = _fake_quant_codes(q, x)
            assert torch.equal(step.expand_as(fake_step), fake_step), name
            assert torch.equal(codes, fake_codes), name
            diff = (p(x).double() - q(x).double()).abs()
            bound = _rounding_bound(q, x)
            assert (diff <= bound).all(), f"{name}: {float((diff - bound).max())} beyond float rounding"
    assert len(inputs) == 12  # every Linear but the unused pooler, which stays float
    if recipe == "post-asq" and "per_token" in act:
        steps = packed.get_submodule("encoder.layer.1.output.dense").input_quant.step_of(
            inputs["encoder.layer.1.output.dense"]
        )
        assert steps.shape == (3, 12, 1) and steps.unique().numel() > 10  # one step per token, all their own
    assert paths, "every layer reported a path"


def test_the_rounding_bound_catches_a_real_difference():
    """The bound is tight enough that one activation code off by one step, or a bias left out, breaks it."""
    torch.manual_seed(1)
    qat = prepare_qat(_tiny_bert(), QATConfig.recipe("post-asq", 4, act={"bits": 8})).eval()
    calibrate(qat, [_padded_batch()])
    layer = dict(quant_layers(qat))["encoder.layer.0.attention.output.dense"]
    x = torch.randn(3, 12, 32)
    with torch.no_grad():
        layer.bias.normal_(std=0.1)  # BERT starts with zero biases
        y = layer(x).double()
        codes, step = _fake_quant_codes(layer, x)
        bumped = codes.clone()
        bumped[0, 0, 0] += 1 if bumped[0, 0, 0] < layer.input_quantizer.qrange[1] else -1
        y_bumped = F.linear(bumped * step, layer.quantized_weight(), layer.bias).double()
        y_no_bias = F.linear(codes * step, layer.quantized_weight()).double()
        bound = _rounding_bound(layer, x)
    assert ((y_bumped - y).abs() > bound).any()
    assert ((y_no_bias - y).abs() > bound).any()
