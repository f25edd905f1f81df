"""The reference LUT path in pure torch: exact integer sums (carried in float64), one rescale per output.

Products of integer activations (|x_int| <= 255) and integer LUT weights (|w| <= 2^15) summed over any
realistic fan-in stay far below 2^53, so float64 holds them exactly: this is the ground truth that fast
kernels are tested against.
"""

from __future__ import annotations

import torch

from ..export.lut import SQRT1_2


def integer_accumulators(layer, x_int: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(acc_even, acc_odd)``: exact integer sums (float64) of ``x_int`` against the even/odd LUT weights."""
    cache = layer.weight._cache
    if "int_weights" not in cache:
        even, odd, _ = layer.weight.integer_weights()
        cache["int_weights"] = (even.double().to(x_int.device), odd.double().to(x_int.device) if odd.any() else None)
    even, odd = cache["int_weights"]
    x64 = x_int.double()
    acc_even = layer.apply_op(x64, even)
    acc_odd = None if odd is None else layer.apply_op(x64, odd)
    return acc_even, acc_odd


def integer_forward_reference(layer, x: torch.Tensor) -> torch.Tensor:
    x_int, step = layer.input_quant(x)
    acc_even, acc_odd = integer_accumulators(layer, x_int)
    unit = layer.weight.lut().unit
    acc = acc_even if acc_odd is None else acc_even + acc_odd * SQRT1_2
    y = combine(layer, acc, step, unit)
    return y.to(x.dtype)


def combine(layer, acc: torch.Tensor, step: torch.Tensor, unit: float) -> torch.Tensor:
    """``y = s_a * scale * unit * acc + bias`` (per-sample step, per-channel scale)."""
    scale = layer.weight.scale.double().reshape(layer.channel_shape(acc))
    y = acc * (scale * unit) * step.double()
    if layer.bias is not None:
        y = y + layer.bias.double().reshape(layer.channel_shape(acc))
    return y
