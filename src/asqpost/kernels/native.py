"""The native CPU kernel: built from ``lut_kernel.cpp`` on first use, with the pure-torch reference as fallback.

The extension is compiled with torch's C++ extension tooling into the per-user torch extensions cache (so
pip's isolated build never has to fetch its own torch); if that fails (no compiler, no ninja), the reference
path runs and one log line says so. ``ASQPOST_KERNEL=reference`` forces the reference path.

Eligible layers: linear layers and convolutions (groups = 1) whose integer activations span at most 256 codes
(unsigned ``[0, 255]`` after ReLU; signed ``[-2^(b-1), 2^(b-1) - 1]`` enter the u8 operand offset by
``2^(b-1)``, and ``offset * sum_k w`` per output, precomputed here, is subtracted from the exact int32 sums),
weight codes of at most 4 bits with LUT integers in int8 (decoded through the tables in the kernel), or wider codes
whose levels are int8 integers without odd powers of sqrt 2 (8-bit LSQ, single-sum POST: stored as int8 weights,
"direct"), and a fan-in small enough that int32 sums cannot overflow.
Convolutions run as indirect convolutions over NHWC codes (one row pointer per output pixel and kernel tap, no
im2col copy) and return channels_last outputs. Other layers take the torch-sums or reference path
(:func:`ineligible_reason` says why).

The kernel splits its work over torch's intra-op threads (``torch.set_num_threads``); results do not depend on
the thread count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .reference import integer_accumulators

if TYPE_CHECKING:
    from ..export.modules import PackedLayer

log = logging.getLogger(__name__)
TILE = 16  # weight rows per tile (one int32 lane each)
GROUP = 8  # k values per 64-byte block of a tile
_STATE: dict[str, Any] = {}


def extension() -> Any | None:
    """The compiled extension module, or ``None`` (logged once) when it cannot be built here."""
    if "module" in _STATE:
        return _STATE["module"]
    module = None
    if os.environ.get("ASQPOST_KERNEL", "auto") != "reference":
        try:
            from torch.utils.cpp_extension import load

            source = Path(__file__).with_name("lut_kernel.cpp")
            module = load(
                name="asqpost_lut_kernel",
                sources=[str(source)],
                # OpenMP: ATen's parallel_for is serial without it; no FMA contraction: the rescale must round
                # each float64 operation as the reference does
                extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
            log.info("asqpost native LUT kernel: %s path", module.capability())
        except Exception as err:  # any build failure means: use the reference path
            log.warning("asqpost native LUT kernel unavailable (%s); using the pure-torch reference path", err)
            module = None
    _STATE["module"] = module
    return module


def available() -> bool:
    return extension() is not None


def _module() -> Any:
    module = extension()
    if module is None:
        raise RuntimeError("the native LUT kernel is not available")
    return module


def capability() -> str:
    """This CPU's fastest kernel path, or ``reference`` without the extension."""
    module = extension()
    return "reference" if module is None else module.capability()


def threads() -> int:
    """The intra-op threads the kernel splits its work over (torch's setting, as ATen reads it; 1 without the
    extension)."""
    module = extension()
    return 1 if module is None else module.threads()


def available_paths() -> list[str]:
    """The kernel paths this CPU runs, fastest first (chosen once, in C++; empty without the extension)."""
    module = extension()
    return [] if module is None else module.available_paths()


def kernel_path(plan: NativePlan) -> str:
    """The path ``plan`` runs here: the one it asks for (``auto``: the fastest), except where that path is not
    exact for its tables (AVX2's int16 pairs could saturate), which runs scalar. Decided in C++."""
    return _module().kernel_path(plan)


def embedding_rows(
    codes: torch.Tensor, byte_levels: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor | None:
    """Rows ``(n, R * P)`` of a packed embedding with whole-byte rows: ``byte_levels[codes[ids], :] * scale[ids]``
    (``codes`` uint8 ``(V, R)``, ``byte_levels`` float32 ``(256, P)``, ``scale`` float32 ``(V,)``, ``ids`` int64),
    in one native pass; ``None`` without the extension or when an id lies outside ``[0, V)``."""
    module = extension()
    return None if module is None else module.embedding_rows(codes, byte_levels, scale, ids)


def hadamard_rows(x: torch.Tensor, block: int) -> torch.Tensor | None:
    """:func:`asqpost.rotation.walsh_hadamard` of float32 CPU ``x`` in one native pass (the same bits), or
    ``None`` without the extension."""
    module = extension()
    return None if module is None else module.hadamard_rows(x, block, 1 / math.sqrt(block))


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


@dataclass(frozen=True, eq=False)
class NativePlan:
    """A packed layer's weights in the form the kernel reads, built once per layer by :func:`prepare`. The C++
    entry points take the plan itself and read these fields by name (``read_plan`` in ``lut_kernel.cpp``).

    ``path`` asks for one kernel path (``auto``: this CPU's fastest; see :func:`kernel_path`). Tests and
    benchmarks make variants (another path, another copy of the weights) with :func:`dataclasses.replace` and
    pass them to :func:`forward` or :func:`lut_matmul`.

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


class ConvOffsets:
    """A conv layer's indirection offsets ``(B, OH, OW, taps)`` per NHWC input shape (built once per shape; the
    ``KEEP`` shapes seen last are kept)."""

    KEEP = 4

    def __init__(self) -> None:
        self._by_shape: dict[tuple[int, ...], torch.Tensor] = {}

    def get(self, geometry: dict, shape: tuple[int, ...]) -> torch.Tensor:
        if shape not in self._by_shape:
            batch, height, width, channels = shape
            if len(self._by_shape) >= self.KEEP:
                self._by_shape.pop(next(iter(self._by_shape)))
            self._by_shape[shape] = extension().conv_offsets(
                batch,
                height,
                width,
                -(-channels // GROUP) * GROUP,
                geometry["kernel_size"],
                geometry["stride"],
                geometry["padding"],
                geometry["dilation"],
            )
        return self._by_shape[shape]


@dataclass
class NativeState:
    """What the native code keeps on a packed weight (``PackedWeight.native_state``; dropped when state is
    loaded): the plan (``None``: the layer is not eligible, for ``reason``), the rescale tensors, the conv
    offsets per shape."""

    plan: NativePlan | None
    col_scale: torch.Tensor
    bias: torch.Tensor
    reason: str = ""
    conv_offsets: ConvOffsets = field(default_factory=ConvOffsets)


def state(layer: PackedLayer) -> NativeState:
    """The layer's native state, built on first use (for a layer with a quantized input and a weight table with
    a small-integer form: a LUT)."""
    held = layer.weight.native_state
    if held is None:
        col_scale, bias = _rescale_tensors(layer)
        reason = ineligible_reason(layer)
        plan = None if reason else _plan(layer, col_scale, bias)
        held = NativeState(plan, col_scale, bias, reason or "")
        layer.weight.native_state = held
    return held


def prepare(layer: PackedLayer) -> NativePlan | None:
    """The layer's plan (built once, kept on it), or ``None`` when the layer is not eligible."""
    return None if layer.weight.lut() is None else state(layer).plan


def input_offset(layer: PackedLayer) -> int:
    """What the kernel adds to the layer's activation codes to make them unsigned: ``-qmin`` if signed, else 0."""
    return max(0, -layer.input_quant.qmin)


def ineligible_reason(layer: PackedLayer) -> str | None:
    """Why the native kernel cannot take this layer (a layer with a quantized input and a LUT), or ``None``."""
    w, inp, lut = layer.weight, layer.input_quant, layer.weight.lut()
    if inp.qmax + input_offset(layer) > 255:
        return f"activation codes [{inp.qmin}, {inp.qmax}] span more than 8 bits"
    if layer.kind == "conv2d" and layer.geometry["groups"] != 1:
        return f"grouped conv (groups={layer.geometry['groups']})"
    if w.bits > 4:  # direct int8 weights
        if lut.has_odd:
            return f"{w.bits}-bit weight codes with odd levels (two sums; single-sum mode stores one)"
        if int(lut.even.min()) < -128 or int(lut.even.max()) > 127:
            return f"{w.bits}-bit weight levels span integers beyond int8"
    elif lut.peak > 127:
        return f"LUT integers up to {lut.peak} do not fit int8"
    elif not ((lut.even == 0) & (lut.odd == 0)).any():
        return "no zero level to pad with"
    if 255 * lut.peak * (w.code_count // w.shape[0]) >= 2**31:
        return "fan-in too large: int32 sums could overflow"
    return None


def _plan(layer: PackedLayer, col_scale: torch.Tensor, bias: torch.Tensor) -> NativePlan:
    """The plan of an eligible layer (see :func:`ineligible_reason`)."""
    w, lut = layer.weight, layer.weight.lut()
    if w.bits > 4:
        even = _rows_2d(layer, lut.even[layer.weight.code_tensor()], 0)
        zeros = torch.zeros(16, dtype=torch.int8)
        plan = NativePlan(direct_weights(even), zeros, zeros, False, w.shape[0], col_scale, bias, direct=True)
        return with_offset(plan, input_offset(layer), even, torch.zeros_like(even))
    zero = (lut.even == 0) & (lut.odd == 0)
    table_even = torch.zeros(16, dtype=torch.int8)
    table_odd = torch.zeros(16, dtype=torch.int8)
    table_even[: lut.even.numel()] = lut.even.to(torch.int8)
    table_odd[: lut.odd.numel()] = lut.odd.to(torch.int8)
    zero_code = int(zero.nonzero()[0])
    codes = _codes_2d(layer, zero_code)
    plan = NativePlan(
        weights=kernel_weights(codes, zero_code),
        lut_even=table_even,
        lut_odd=table_odd,
        has_odd=lut.has_odd,
        n=w.shape[0],
        col_scale=col_scale,
        bias=bias,
    )
    return with_offset(plan, input_offset(layer), lut.even[codes], lut.odd[codes])


def _rescale_tensors(layer: PackedLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale * unit, bias)`` in float64 as the rescale reads them (bias empty when the layer has none)."""
    bias = torch.zeros(0, dtype=torch.float64) if layer.bias is None else layer.bias.detach().double().contiguous()
    return layer.weight.scale.detach().double().contiguous() * layer.weight.lut().unit, bias


def _codes_2d(layer: PackedLayer, zero_code: int) -> torch.Tensor:
    """Codes as ``(N, K)`` in the order the kernel reads activations (see :func:`_rows_2d`)."""
    return _rows_2d(layer, layer.weight.code_tensor(), zero_code)


def _rows_2d(layer: PackedLayer, weight: torch.Tensor, fill: int) -> torch.Tensor:
    """A weight-shaped tensor as ``(N, K)`` in the order the kernel reads activations: a linear weight as it is; a
    conv weight ``(Cout, C, kh, kw)`` as ``(Cout, kh, kw, Cp)`` (NHWC taps, channels padded to a multiple of 8
    with ``fill``)."""
    if layer.kind != "conv2d":
        return weight.reshape(weight.shape[0], -1)
    cout, c, kh, kw = weight.shape
    per_tap = torch.full((cout, kh, kw, -(-c // GROUP) * GROUP), fill, dtype=weight.dtype)
    per_tap[..., :c] = weight.permute(0, 2, 3, 1)
    return per_tap.reshape(cout, -1)


def lut_matmul(x_u8: torch.Tensor, plan: NativePlan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact int32 ``(acc_even, acc_odd)`` of the codes ``x_u8 - plan.offset`` (uint8 rows ``(M, K)``) against a
    linear weight's plan."""
    module = _module()
    k = x_u8.shape[1]
    kp = plan_k(plan)
    if k != kp:
        x_u8 = F.pad(x_u8, (0, kp - k))
    acc_even, acc_odd = module.lut_linear(x_u8.contiguous(), plan)
    return acc_even, (acc_odd if plan.has_odd else None)


def forward(layer: PackedLayer, x: torch.Tensor, plan: NativePlan) -> torch.Tensor | None:
    """A packed layer in one native call (quantize, accumulate, rescale) with ``plan`` (its own, or a variant of
    it), equal to the reference path; ``None`` when this input must take the reference path (a conv input
    holding NaN or inf)."""
    inp = layer.input_quant
    step = inp.step_of(x)
    if layer.kind == "conv2d":
        return _conv_forward(layer, x, step, (inp.qmin, inp.qmax), plan)
    # at batch 1 the Python around the call is a third of a layer's time: shapes and types are handled natively
    if step.numel() != 1:  # ASQ's s * beta: one per sample or token, broadcast to one per row
        step = step.expand(*x.shape[:-1], 1)
    return extension().lut_linear_forward(x, step, inp.qmin, inp.qmax, plan)


def _conv_forward(
    layer: PackedLayer, x: torch.Tensor, step: torch.Tensor, qrange: tuple[int, int], plan: NativePlan
) -> torch.Tensor | None:
    nhwc = x.float().permute(0, 2, 3, 1).contiguous()  # free when x is already channels_last
    step_rows = step.reshape(-1).float().contiguous()  # one value, or one per sample (ASQ)
    offsets = state(layer).conv_offsets.get(layer.geometry, tuple(nhwc.shape))
    y = extension().lut_conv2d_forward(nhwc, step_rows, *qrange, offsets, plan)
    if y.numel() == 0:
        return None
    # NHWC rows viewed as (B, Cout, OH, OW): a channels_last tensor, which the next conv reads without a copy
    return y.view(*offsets.shape[:3], -1).permute(0, 3, 1, 2).to(x.dtype)


def forward_torch_sums(layer: PackedLayer, x: torch.Tensor) -> torch.Tensor:
    """A layer the kernel does not take (8-bit codes, grouped conv, ...): torch computes the exact sums
    as the reference does, native code the float64 rescale (bit-identical to the reference, several times
    faster than torch's float64 elementwise passes)."""
    x_int, step = layer.input_quant(x)
    acc_even, acc_odd = integer_accumulators(layer, x_int)
    held = state(layer)
    if layer.kind == "conv2d":  # (B, C, H, W) -> (B, C, H * W), one step per sample
        shape = (acc_even.shape[0], acc_even.shape[1], -1)
        step_rows = step.reshape(-1)
    else:  # (..., C) -> (R, C, 1), one step per row
        shape = (-1, acc_even.shape[-1], 1)
        step_rows = step if step.numel() == 1 else step.expand(*acc_even.shape[:-1], 1).reshape(-1)
    odd = torch.zeros(0) if acc_odd is None else acc_odd.contiguous().reshape(shape)
    y = extension().rescale_sums(
        acc_even.contiguous().reshape(shape), odd, held.col_scale, held.bias, step_rows.float().contiguous()
    )
    return y.reshape(acc_even.shape).to(x.dtype)
