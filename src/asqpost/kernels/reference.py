"""The reference LUT path in pure torch: exact integer sums, one rescale per output (in float64).

The sums are carried in floating point, which is exact while every partial sum is an integer below the
format's limit: float32 when ``max|x_int| * max|w_int| * fan_in < 2^24`` (then torch's optimised float
kernels, oneDNN for convolutions, compute them exactly and fast), float64 otherwise (``< 2^53`` for any
realistic layer). This is the ground truth that the native kernel is tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..levels import SQRT1_2

if TYPE_CHECKING:
    from ..export.modules import PackedLayer


def exact_dtype(layer: PackedLayer) -> torch.dtype:
    """float32 when no partial sum can reach 2^24 (exact in float32), else float64."""
    lut = layer.weight.lut()
    biggest = int(max(lut.even.abs().max(), lut.odd.abs().max()))
    x_max = max(abs(layer.input_quant.qmin), abs(layer.input_quant.qmax))
    fan_in = layer.weight.code_count // layer.weight.shape[0]
    return torch.float32 if x_max * biggest * fan_in < 2**24 else torch.float64


def integer_accumulators(layer: PackedLayer, x_int: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(acc_even, acc_odd)``: exact integer sums of ``x_int`` against the even/odd LUT weights."""
    cache = layer.weight._cache
    if "int_weights" not in cache:
        dtype = exact_dtype(layer)
        even, odd, _ = layer.weight.integer_weights()
        on = x_int.device
        cache["int_weights"] = (even.to(on, dtype), odd.to(on, dtype) if odd.any() else None)
    even, odd = cache["int_weights"]
    x = x_int.to(even.dtype)
    acc_even = layer.apply_op(x, even)
    acc_odd = None if odd is None else layer.apply_op(x, odd)
    return acc_even, acc_odd


def integer_forward_reference(layer: PackedLayer, x: torch.Tensor) -> torch.Tensor:
    x_int, step = layer.input_quant(x)
    acc_even, acc_odd = integer_accumulators(layer, x_int)
    unit = layer.weight.lut().unit
    acc = acc_even.double() if acc_odd is None else acc_even.double() + acc_odd.double() * SQRT1_2
    y = combine(layer, acc, step, unit)
    return y.to(x.dtype)


def combine(layer: PackedLayer, acc: torch.Tensor, step: torch.Tensor, unit: float) -> torch.Tensor:
    """``y = s_a * scale * unit * acc + bias`` (per-sample step, per-channel scale)."""
    scale = layer.weight.scale.double().reshape(layer.channel_shape(acc))
    y = acc * (scale * unit) * step.double()
    if layer.bias is not None:
        y = y + layer.bias.double().reshape(layer.channel_shape(acc))
    return y
