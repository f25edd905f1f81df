"""The native CPU backend: packed layers in one call of the C++ kernel (quantize, LUT accumulate, rescale), and the
torch-sums backend (torch's exact sums with the native rescale) for the layers the kernel does not take.

Eligible layers: linear layers and convolutions (groups = 1) whose integer activations span at most 256 codes
(unsigned ``[0, 255]`` after ReLU; signed ``[-2^(b-1), 2^(b-1) - 1]`` enter the u8 operand offset by
``2^(b-1)``, and ``offset * sum_k w`` per output, precomputed here, is subtracted from the exact int32 sums),
weight codes of at most 4 bits with LUT integers in int8 (decoded through the tables in the kernel), or wider codes
whose levels are int8 integers without odd powers of sqrt 2 (8-bit LSQ, POST on the int8 lattice, single-sum
POST: stored as int8 weights, "direct"), and a fan-in small enough that int32 sums cannot overflow.
Convolutions run as indirect convolutions over NHWC codes (one row pointer per output pixel and kernel tap, no
im2col copy) and return channels_last outputs. :func:`ineligible_reason` says why a layer is not taken.

The kernel splits its work over torch's intra-op threads (``torch.set_num_threads``); results do not depend on
the thread count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..packed import ConvGeometry, LayerSpec
from . import extension
from .backends import Backend, grouped_reason, integer_reason
from .extension import available, capability
from .reference import ReferencePlan, integer_accumulators, reference_plan

TILE = 16  # weight rows per tile (one int32 lane each)
GROUP = 8  # k values per 64-byte block of a tile
NOT_BUILT = "native kernel not built here"


def direct_weights(weights: torch.Tensor) -> torch.Tensor:
    """Integer weights ``(N, K)`` (values in int8) as int8 tiles ``(ceil(N / 16), Kp * 16)``: the decoded form of
    :func:`kernel_weights`'s blocks. N and K are padded with zeros; in tile ``t``, block ``b`` (128 bytes), byte
    ``4 r + i`` holds ``w[16 t + r, 8 b + i]`` and byte ``64 + 4 r + i`` holds ``w[16 t + r, 8 b + 4 + i]``."""
    n, k = weights.shape
    tiles, kp = -(-n // TILE), -(-k // GROUP) * GROUP
    padded = torch.zeros((tiles * TILE, kp), dtype=torch.int64)
    padded[:n, :k] = weights
    # (tile, row, block, half, i) -> (tile, block, half, row, i)
    grouped = padded.reshape(tiles, TILE, kp // GROUP, 2, GROUP // 2).permute(0, 2, 3, 1, 4)
    return grouped.reshape(tiles, kp * TILE).to(torch.int8).contiguous()


def plan_k(plan: NativePlan) -> int:
    """K padded to a multiple of 8, as the plan's weights hold it."""
    per_tile = plan.weights.shape[1]
    return per_tile // TILE if plan.direct else per_tile * 2 // TILE


def kernel_weights(codes: torch.Tensor, zero_code: int) -> torch.Tensor:
    """Reorder 2-D codes ``(N, K)`` (values < 16) into the kernel's tile layout ``(ceil(N / 16), Kp * 8)`` uint8.

    N is padded to a multiple of 16 and K to a multiple of 8 with ``zero_code`` (a level equal to 0). Tile ``t``
    is ``Kp / 8`` blocks of 64 bytes; in block ``b`` byte ``4 r + i`` holds ``code[16 t + r, 8 b + i]`` in its low
    nibble and ``code[16 t + r, 8 b + 4 + i]`` in its high nibble.
    """
    n, k = codes.shape
    tiles, kp = -(-n // TILE), -(-k // GROUP) * GROUP
    padded = torch.full((tiles * TILE, kp), zero_code, dtype=torch.int64)
    padded[:n, :k] = codes
    # (tile, row, block, nibble, i) -> (tile, block, row, i, nibble)
    grouped = padded.reshape(tiles, TILE, kp // GROUP, 2, GROUP // 2).permute(0, 2, 1, 4, 3)
    packed = grouped[..., 0] | (grouped[..., 1] << 4)
    return packed.reshape(tiles, kp * TILE // 2).to(torch.uint8).contiguous()


class ConvOffsets:
    """A conv layer's indirection offsets ``(B, OH, OW, taps)`` per NHWC input shape (built once per shape; the
    ``KEEP`` shapes seen last are kept; inside ``torch.compile`` they are part of the graph instead)."""

    KEEP = 4

    def __init__(self) -> None:
        self._by_shape: dict[tuple[int, ...], torch.Tensor] = {}

    def get(self, geometry: ConvGeometry, shape: tuple[int, int, int, int]) -> torch.Tensor:
        padded = -(-shape[3] // GROUP) * GROUP
        if torch.compiler.is_compiling():
            return extension.conv_offsets(shape, geometry, padded)
        if shape not in self._by_shape:
            if len(self._by_shape) >= self.KEEP:
                self._by_shape.pop(next(iter(self._by_shape)))
            self._by_shape[shape] = extension.conv_offsets(shape, geometry, padded)
        return self._by_shape[shape]


@dataclass(frozen=True, eq=False)
class NativePlan:
    """A packed layer in the form the kernel reads, built once per layer by :func:`native_plan`; the C++ entry
    points take its fields as typed arguments (:meth:`kernel_args`).

    ``path`` asks for one kernel path (``auto``: this CPU's fastest; see :func:`kernel_path`). Tests and
    benchmarks make variants (another path, another copy of the weights) with :func:`dataclasses.replace` and
    run them with :meth:`NativeBackend.run` or :func:`lut_matmul`.

    ``offset`` is added to every activation code to make it unsigned (``-qmin`` for a signed input, else 0);
    ``correction_even`` / ``correction_odd`` hold ``offset * sum_k table[code[n, k]]`` per output (int32), which
    the kernel subtracts from its sums (see :func:`with_offset`).

    ``direct``: ``weights`` holds the int8 weights themselves (:func:`direct_weights`; codes wider than 4 bits),
    the tables are unused.
    """

    weights: torch.Tensor  # uint8 (ceil(n / 16), Kp * 8): the codes in the tile layout of kernel_weights
    lut_even: torch.Tensor  # int8 (16,): the even table, zero-padded
    lut_odd: torch.Tensor  # int8 (16,): the odd table (all zero without odd levels)
    has_odd: bool
    n: int  # output features
    col_scale: torch.Tensor  # float64 (n,): scale * unit
    bias: torch.Tensor  # float64 (n,), or empty
    path: str = "auto"
    offset: int = 0
    correction_even: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))
    correction_odd: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))
    direct: bool = False
    qmin: int = 0  # the activation codes' range
    qmax: int = 255
    conv: ConvGeometry | None = None  # a conv layer's geometry (None: linear)
    offsets: ConvOffsets = field(default_factory=ConvOffsets)  # the conv's indirection offsets per input shape

    def kernel_args(self) -> tuple:
        """The fields the C++ entry points take, in their order."""
        return (
            self.weights, self.lut_even, self.lut_odd, self.has_odd, self.n, self.col_scale, self.bias, self.path,
            self.offset, self.correction_even, self.correction_odd, self.direct,
        )  # fmt: skip


def kernel_path(plan: NativePlan) -> str:
    """The path ``plan`` runs here: the one it asks for (``auto``: the fastest); every path is exact for every plan
    (AVX2 splits wide tables and direct int8 weights so that its int16 pairs cannot saturate). Decided in C++."""
    return extension.module().kernel_path(*plan.kernel_args())


def with_offset(plan: NativePlan, offset: int, even: torch.Tensor, odd: torch.Tensor) -> NativePlan:
    """``plan`` for activation codes entering the kernel as ``code + offset``: ``even`` / ``odd`` are the integer
    weights ``(n, K)`` (the tables applied to the codes), whose row sums times ``offset`` are the corrections."""
    if offset == 0:
        return dataclasses.replace(plan, offset=0)

    def correction(w: torch.Tensor) -> torch.Tensor:
        c = offset * w.long().sum(dim=1)
        if c.abs().max() >= 2**31:
            raise ValueError(f"offset {offset} times a weight row's sum does not fit int32")
        return c.to(torch.int32).contiguous()

    corr_odd = correction(odd) if plan.has_odd else torch.zeros(0, dtype=torch.int32)
    return dataclasses.replace(plan, offset=offset, correction_even=correction(even), correction_odd=corr_odd)


def ineligible_reason(spec: LayerSpec) -> str | None:
    """Why the native kernel cannot take this integer layer, or ``None``."""
    w, inp, lut = spec.weight, spec.input, spec.lut
    if inp.qmax + inp.offset > 255:
        return f"activation codes [{inp.qmin}, {inp.qmax}] span more than 8 bits"
    if why := grouped_reason(spec):
        return why
    if w.bits > 4:  # direct int8 weights
        if lut.has_odd:
            return f"{w.bits}-bit weight codes with odd levels (two sums; single-sum mode stores one)"
        if int(lut.even.min()) < -128 or int(lut.even.max()) > 127:
            return f"{w.bits}-bit weight levels span integers beyond int8"
    elif lut.peak > 127:
        return f"LUT integers up to {lut.peak} do not fit int8"
    elif not ((lut.even == 0) & (lut.odd == 0)).any():
        return "no zero level to pad with"
    if 255 * lut.peak * w.fan_in >= 2**31:
        return "fan-in too large: int32 sums could overflow"
    return None


def native_plan(spec: LayerSpec) -> NativePlan:
    """The plan of an eligible layer (see :func:`ineligible_reason`)."""
    w, lut = spec.weight, spec.lut
    col_scale, bias = spec.rescale()
    conv = spec.geometry if isinstance(spec.geometry, ConvGeometry) else None
    common = {"n": w.out_channels, "col_scale": col_scale, "bias": bias, "conv": conv}
    common.update(qmin=spec.input.qmin, qmax=spec.input.qmax)
    if w.bits > 4:
        even = _rows_2d(spec, lut.even[w.codes], 0)
        zeros = torch.zeros(16, dtype=torch.int8)
        plan = NativePlan(direct_weights(even), zeros, zeros, False, direct=True, **common)
        return with_offset(plan, spec.input.offset, even, torch.zeros_like(even))
    table_even = torch.zeros(16, dtype=torch.int8)
    table_odd = torch.zeros(16, dtype=torch.int8)
    table_even[: lut.even.numel()] = lut.even.to(torch.int8)
    table_odd[: lut.odd.numel()] = lut.odd.to(torch.int8)
    zero_code = int(((lut.even == 0) & (lut.odd == 0)).nonzero()[0])
    codes = _rows_2d(spec, w.codes, zero_code)
    plan = NativePlan(kernel_weights(codes, zero_code), table_even, table_odd, lut.has_odd, **common)
    return with_offset(plan, spec.input.offset, lut.even[codes], lut.odd[codes])


def _rows_2d(spec: LayerSpec, weight: torch.Tensor, fill: int) -> torch.Tensor:
    """A weight-shaped tensor as ``(N, K)`` in the order the kernel reads activations: a linear weight as it is; a
    conv weight ``(Cout, C, kh, kw)`` as ``(Cout, kh, kw, Cp)`` (NHWC taps, channels padded to a multiple of 8
    with ``fill``)."""
    if spec.kind != "conv2d":
        return weight.reshape(weight.shape[0], -1)
    cout, c, kh, kw = weight.shape
    per_tap = torch.full((cout, kh, kw, -(-c // GROUP) * GROUP), fill, dtype=weight.dtype)
    per_tap[..., :c] = weight.permute(0, 2, 3, 1)
    return per_tap.reshape(cout, -1)


def lut_matmul(x_u8: torch.Tensor, plan: NativePlan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact int32 ``(acc_even, acc_odd)`` of the codes ``x_u8 - plan.offset`` (uint8 rows ``(M, K)``) against a
    linear weight's plan."""
    kp = plan_k(plan)
    if x_u8.shape[1] != kp:
        x_u8 = F.pad(x_u8, (0, kp - x_u8.shape[1]))
    acc_even, acc_odd = extension.module().lut_linear(x_u8.contiguous(), *plan.kernel_args())
    return acc_even, (acc_odd if plan.has_odd else None)


def _on_cpu_float32(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32  # native code rounds y to float32 once, as models do


class NativeBackend(Backend):
    """The C++ kernel: float32 CPU inputs of the layers :func:`ineligible_reason` takes."""

    name = "native"
    modes = frozenset({"auto", "native"})

    def takes(self, device: torch.device, dtype: torch.dtype, kernel: str) -> bool:
        return _on_cpu_float32(device, dtype)

    def missing(self, device: torch.device) -> str | None:
        return None if available() else "kernel=native but the native LUT kernel could not be built here"

    def eligible(self, spec: LayerSpec) -> str | None:
        return integer_reason(spec) or (None if available() else NOT_BUILT) or ineligible_reason(spec)

    def prepare(self, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> NativePlan:
        return native_plan(spec)

    def run(self, plan: NativePlan, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        if plan.conv is None:  # at batch 1 the Python around the call shows: shapes and types are handled natively
            if step.numel() != 1:  # ASQ's s * beta: one per sample or token, broadcast to one per row
                step = step.expand(*x.shape[:-1], 1)
            return extension.lut_linear(x, step, plan.qmin, plan.qmax, plan.kernel_args())
        nhwc = x.float().permute(0, 2, 3, 1).contiguous()  # free when x is already channels_last
        offsets = plan.offsets.get(plan.conv, tuple(nhwc.shape))
        step_rows = step.reshape(-1).float().contiguous()  # one value, or one per sample (ASQ)
        y = extension.lut_conv2d(nhwc, step_rows, plan.qmin, plan.qmax, offsets, plan.kernel_args())
        # NHWC rows viewed as (B, Cout, OH, OW): a channels_last tensor, which the next conv reads without a copy
        return y.view(*offsets.shape[:3], -1).permute(0, 3, 1, 2).to(x.dtype)

    def describe(self, plan: NativePlan, spec: LayerSpec) -> tuple[str, str]:
        path = kernel_path(plan)
        if path != capability():
            return f"native {path}", f"{path} requested"
        return f"native {path}", "signed input, offset codes" if plan.offset else "unsigned input"


@dataclass(frozen=True, eq=False)
class TorchSumsPlan:
    reference: ReferencePlan
    bias: torch.Tensor  # float64 (C_out,) or empty, as the native rescale reads it


class TorchSumsBackend(Backend):
    """Layers the kernel does not take (8-bit codes with odd levels, grouped convs, ...): torch computes the exact
    sums as the reference does, native code the float64 rescale (the reference's bits, several times faster than
    torch's float64 elementwise passes)."""

    name = "torch sums"
    modes = frozenset({"auto", "native"})

    def takes(self, device: torch.device, dtype: torch.dtype, kernel: str) -> bool:
        return _on_cpu_float32(device, dtype)

    def eligible(self, spec: LayerSpec) -> str | None:
        return integer_reason(spec) or (None if available() else NOT_BUILT)

    def prepare(self, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> TorchSumsPlan:
        plan = reference_plan(spec, device)
        bias = torch.zeros(0, dtype=torch.float64) if plan.bias is None else plan.bias.contiguous()
        return TorchSumsPlan(plan, bias)

    def run(self, plan: TorchSumsPlan, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        reference = plan.reference
        acc_even, acc_odd = integer_accumulators(reference, reference.input.quantize(x, step))
        if isinstance(reference.geometry, ConvGeometry):  # (B, C, H, W) -> (B, C, H * W), a step per sample
            shape, step_rows = (acc_even.shape[0], acc_even.shape[1], -1), step.reshape(-1)
        else:  # (..., C) -> (R, C, 1), one step per row
            shape = (-1, acc_even.shape[-1], 1)
            step_rows = step if step.numel() == 1 else step.expand(*acc_even.shape[:-1], 1).reshape(-1)
        odd = torch.zeros(0) if acc_odd is None else acc_odd.contiguous().reshape(shape)
        sums = acc_even.contiguous().reshape(shape)
        y = extension.module().rescale_sums(sums, odd, reference.col_scale, plan.bias, step_rows.float().contiguous())
        return y.reshape(acc_even.shape).to(x.dtype)
