"""A packed layer as plain typed data: what every kernel backend reads, and all it reads.

Kernels (:mod:`asqpost.kernels`) see a packed layer only as a :class:`LayerSpec`, built by the packed module
from its buffers (:meth:`asqpost.export.PackedLayer.spec`). Two things depend on more than this data, so the
module computes them per input and hands them to the kernel with it: the folded input (SmoothQuant's division by
``smooth``, then the Hadamard rotation of ``rotate``) and the activation step ``s_a`` (LSQ's ``s``, or ASQ's
``s * beta(x)`` from the layer's adapter). For a layer with a quantized input and an integer table a kernel
computes, per output channel ``n``::

    x_int = clamp(round(x / s_a), qmin, qmax)
    y[n] = s_a * col_scale[n] * (acc_even[n] + acc_odd[n] / sqrt 2) + bias[n]
    acc_even = x_int . lut.even[codes[n]],  acc_odd = x_int . lut.odd[codes[n]]

with ``col_scale = scale * lut.unit`` (:meth:`LayerSpec.rescale`). Shapes: ``C_out`` output channels, ``K`` weights
per output channel (``in_features``, or ``C_in / groups * kh * kw``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .lut import IntegerLUT


@dataclass(frozen=True)
class LinearGeometry:
    """``F.linear``: inputs ``(N, C)`` or ``(N, T, C)``, ``C = in_features``."""

    in_features: int
    out_features: int

    def apply(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, w, bias)

    def channel_shape(self, y: torch.Tensor) -> tuple[int, ...]:
        """The shape that broadcasts a per-output-channel vector against the output ``y``."""
        return (1,) * (y.dim() - 1) + (-1,)

    @property
    def input_channels(self) -> int:
        return self.in_features


@dataclass(frozen=True)
class ConvGeometry:
    """``F.conv2d`` with zero padding: inputs ``(N, C_in, H, W)``; pairs are ``(height, width)``."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def __post_init__(self) -> None:  # lists from a JSON header become tuples
        for name in ("kernel_size", "stride", "padding", "dilation"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))

    def apply(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def channel_shape(self, y: torch.Tensor) -> tuple[int, ...]:
        return (1, -1, 1, 1)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(OH, OW)`` of an input of ``height x width``."""
        sizes = (height, width)
        return tuple(  # type: ignore[return-value]
            (sizes[i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1) // self.stride[i] + 1
            for i in range(2)
        )

    @property
    def input_channels(self) -> int:
        return self.in_channels


Geometry = LinearGeometry | ConvGeometry


@dataclass(frozen=True, eq=False)
class WeightSpec:
    """Weights as codes into a level table: ``w[n, ...] = table[codes[n, ...]] * scale[n]``."""

    codes: torch.Tensor  # int64, weight-shaped (C_out, in_features) or (C_out, C_in / groups, kh, kw): < len(table)
    table: torch.Tensor  # float64 (L,), L <= 2**bits: the levels
    lut: IntegerLUT | None  # the table as unit * (even + odd / sqrt 2) in small integers; None: no such form
    scale: torch.Tensor  # (C_out,), float32 as stored (another float dtype after a module's .to(dtype))
    bits: int  # code width, 1..8

    @property
    def out_channels(self) -> int:
        return self.codes.shape[0]

    @property
    def fan_in(self) -> int:
        """``K``: weights per output channel."""
        return self.codes[0].numel()

    def integer_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(even, odd)`` int64, weight-shaped: ``w = scale * unit * (even + odd / sqrt 2)`` (needs :attr:`lut`)."""
        if self.lut is None:
            raise ValueError("this table has no small-integer form")
        return self.lut.even[self.codes], self.lut.odd[self.codes]

    def dequantize(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The float weight ``table[codes] * scale`` in ``dtype`` on ``device`` (what fake quantization made)."""
        scale = self.scale.to(device, dtype).reshape((-1,) + (1,) * (self.codes.dim() - 1))
        return self.table.to(device, dtype)[self.codes.to(device)] * scale


@dataclass(frozen=True)
class InputSpec:
    """The activation codes' range, and where the step comes from."""

    qmin: int
    qmax: int
    adaptive: bool  # False: LSQ's stored step (one value); True: ASQ's s * beta(x), one per sample or token

    @property
    def offset(self) -> int:
        """What makes every code unsigned: ``-qmin`` for a signed range, else 0."""
        return max(0, -self.qmin)

    def quantize(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """``clamp(round(x / step), qmin, qmax)`` in ``x``'s float type."""
        return torch.clamp(torch.round(x / step), self.qmin, self.qmax)


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """One packed linear or conv layer (see the module docstring for the maths)."""

    geometry: Geometry
    weight: WeightSpec | None  # None: the weight stays float (float_weight)
    float_weight: torch.Tensor | None  # weight-shaped float, only when weight is None
    input: InputSpec | None  # None: the input stays float
    bias: torch.Tensor | None  # (C_out,) float
    smooth: torch.Tensor | None  # (C_in,): SmoothQuant's divisor; the input a kernel gets is already divided
    rotate: int | None  # Hadamard block over the input channels; the input a kernel gets is already rotated

    @property
    def kind(self) -> str:
        return "conv2d" if isinstance(self.geometry, ConvGeometry) else "linear"

    @property
    def lut(self) -> IntegerLUT | None:
        """The integer table, where the layer runs on integers: a quantized input and a table with that form."""
        return None if self.input is None or self.weight is None else self.weight.lut

    def rescale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(col_scale, bias)`` in float64, contiguous, on the CPU: ``scale * unit`` ``(C_out,)`` and the bias
        (empty without one): what every integer kernel multiplies its sums with."""
        col_scale = self.weight.scale.detach().cpu().double().contiguous() * self.lut.unit
        bias = torch.zeros(0, dtype=torch.float64) if self.bias is None else self.bias.detach().cpu().double()
        return col_scale, bias.contiguous()

    def product_bound(self) -> int:
        """The largest ``|x_int * w_int|`` of an integer layer."""
        return max(abs(self.input.qmin), abs(self.input.qmax)) * self.lut.peak
