"""Model size as stored: quantized weights at their bit width, everything else in float32."""

from __future__ import annotations

from torch import nn

from .adapters import StepAdapter
from .convert import quant_embeddings, quant_layers

FLOAT_BYTES = 4


def model_size_bytes(model: nn.Module, as_float: bool = False) -> int:
    """Bytes of all parameters and floating buffers; quantized weights count ``bits`` per element.

    With ``as_float`` the quantizers are left out and every tensor counts as float32 (the float model's
    size). Per-channel scales, steps and adapters count as float32. Integer buffers (BN's
    ``num_batches_tracked``) are not model data.
    """
    quantized_weights: dict[int, int] = {}
    quantizer_tensors: set[int] = set()
    for _, layer in [*quant_layers(model), *quant_embeddings(model)]:
        for q in (layer.weight_quantizer, getattr(layer, "input_quantizer", None)):
            if q is not None:
                quantizer_tensors.update(id(t) for t in [*q.parameters(), *q.buffers()])
        if layer.weight_quantizer is not None:
            quantized_weights[id(layer.weight)] = layer.weight_quantizer.bits
    bits = 0
    for tensor in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
        if as_float and id(tensor) in quantizer_tensors:
            continue
        bits += tensor.numel() * (8 * FLOAT_BYTES if as_float else quantized_weights.get(id(tensor), 8 * FLOAT_BYTES))
    return (bits + 7) // 8


def adapter_parameters(model: nn.Module) -> dict[str, float]:
    """What the ASQ step adapters cost: ``{"adapters": n, "model": m, "share": n / m}``.

    ``n`` counts every adapter parameter once (a quantizer shared by Q, K and V counts once); ``m`` the
    model's own parameters, quantizers left out (the float model's count). The adapter size is
    ``QuantizerConfig.adapter_reduction`` / ``adapter_hidden``.
    """
    adapter_params = {id(p): p for a in model.modules() if isinstance(a, StepAdapter) for p in a.parameters()}
    quantizers = [
        q
        for _, layer in [*quant_layers(model), *quant_embeddings(model)]
        for q in (layer.weight_quantizer, getattr(layer, "input_quantizer", None))
        if q is not None
    ]
    quantizer_ids = {id(p) for q in quantizers for p in q.parameters()}
    n = sum(p.numel() for p in adapter_params.values())
    m = sum(p.numel() for p in model.parameters() if id(p) not in quantizer_ids)
    return {"adapters": n, "model": m, "share": n / m if m else 0.0}
