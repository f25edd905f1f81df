"""The reference LUT path in pure torch: exact integer sums, one rescale per output (in float64).

The sums are carried in floating point, which is exact while every partial sum is an integer below the
format's limit: float32 when ``max|x_int| * max|w_int| * fan_in < 2^24`` (then torch's optimised float
kernels, oneDNN for convolutions, compute them exactly and fast). A linear layer with a larger fan-in (8-bit
codes into 1536 inputs, say) sums runs of ``k`` short enough for that bound in float32 and adds the runs'
exact results in float64; other layers sum in float64 (``< 2^53`` for any realistic layer). This is the
ground truth that the native kernel is tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..levels import SQRT1_2

if TYPE_CHECKING:
    from ..export.modules import PackedLayer


FLOAT32_EXACT = 2**24  # every integer up to this is a float32
MIN_RUN = 64  # shorter runs of k than this: float64 sums instead


def exact_dtype(layer: PackedLayer) -> torch.dtype:
    """float32 when no partial sum can reach 2^24 (exact in float32), else float64."""
    return torch.float32 if _product_bound(layer) * _fan_in(layer) < FLOAT32_EXACT else torch.float64


def exact_run(layer: PackedLayer) -> int | None:
    """For a linear layer whose whole sums could pass 2^24: the longest run of ``k`` whose float32 sums stay
    exact (at least ``MIN_RUN``), else ``None`` (sum all of ``k`` at once in :func:`exact_dtype`)."""
    if layer.kind != "linear" or exact_dtype(layer) == torch.float32:
        return None
    run = (FLOAT32_EXACT - 1) // _product_bound(layer)
    return run if run >= MIN_RUN else None


def _product_bound(layer: PackedLayer) -> int:
    """The largest ``|x_int * w_int|`` of the layer."""
    biggest = layer.weight.lut().peak
    return max(abs(layer.input_quant.qmin), abs(layer.input_quant.qmax)) * biggest


def _fan_in(layer: PackedLayer) -> int:
    return layer.weight.code_count // layer.weight.shape[0]


def _integer_weights(layer: PackedLayer, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The even / odd integer weights as the sums read them (cached): one tensor in :func:`exact_dtype`, or
    float32 column runs of :func:`exact_run` (odd ``None`` without odd levels)."""
    cache = layer.weight._cache
    if "int_weights" not in cache:
        run = exact_run(layer)
        dtype = torch.float32 if run else exact_dtype(layer)
        even, odd, _ = layer.weight.integer_weights()

        def runs(w: torch.Tensor) -> list[torch.Tensor]:
            w = w.to(device, dtype)
            return [w] if run is None else [part.contiguous() for part in w.split(run, dim=1)]

        cache["int_weights"] = (runs(even), runs(odd) if odd.any() else None)
    return cache["int_weights"]  # type: ignore[return-value]


def _sums(layer: PackedLayer, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return layer.apply_op(x.to(parts[0].dtype), parts[0])
    acc, start = None, 0
    for part in parts:  # exact float32 runs, added exactly in float64
        run = layer.apply_op(x[..., start : start + part.shape[1]].float(), part).double()
        acc, start = run if acc is None else acc + run, start + part.shape[1]
    return acc


def integer_accumulators(layer: PackedLayer, x_int: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(acc_even, acc_odd)``: exact integer sums of ``x_int`` against the even/odd LUT weights."""
    even, odd = _integer_weights(layer, x_int.device)
    return _sums(layer, x_int, even), None if odd is None else _sums(layer, x_int, odd)


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
