"""The Triton LUT kernel for packed layers on CUDA (and on CPU under Triton's interpreter, ``TRITON_INTERPRET=1``).

One kernel computes a packed linear layer (convolutions, groups = 1, run it on im2col rows): per row tile it
loads the float inputs and quantizes them in registers (``clamp(round(x / s_a), qmin, qmax)`` with the row's
LSQ or ASQ step, the same IEEE operations as the reference), unpacks the b-bit weight codes from int32 words,
looks the integer levels up (a table held in registers for codes of at most 4 bits, an L1-resident table for
5..8 bits), and accumulates with ``tl.dot`` on tensor cores; the rescale ``acc * scale * unit * s_a + bias`` runs
in float64 in the epilogue, in the reference's order (no FMA contraction).

Exactness: the output equals :func:`~asqpost.kernels.reference.integer_forward_reference` bit for bit. The
sums are integers: the ``int8`` dot (activation codes and level integers in [-128, 127]) accumulates in int32;
the ``fp16`` dot (codes and levels up to 2048, exact in fp16) adds the products of one ``BLOCK_K`` chunk in
float32, exact while ``max|x| * max|w| * BLOCK_K < 2^24`` (tensor cores form fp16 products exactly and keep 24
bits of the largest addend), and carries the chunk sums in int32. Levels above 512 are split into two fp16
digits ``w = 1024 hi + lo`` (two dots, joined exactly in float64). Every accumulator stays below 2^31. A layer
outside these bounds (or a grouped conv, a float64 input) returns ``None``: the caller runs the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..levels import SQRT1_2
from ..packed import ConvGeometry, InputSpec, LayerSpec
from .backends import Backend, grouped_reason, integer_reason

BLOCK_K = 64  # the k chunk whose float32 sums the fp16 bound is stated for
SPLIT_BASE = 1024  # w = SPLIT_BASE * hi + lo when the fp16 levels would be too large
QUOTIENT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the dtype x / s_a rounds to
_STATE: dict[str, Any] = {}

tl: Any = None  # triton.language, bound on first use: importing triton is slow and its mode is read at jit time


def available() -> bool:
    """Whether triton imports here (the kernel is compiled on first use, or interpreted under TRITON_INTERPRET)."""
    return _kernel() is not None


def interpreted() -> bool:
    """Whether the kernel runs in Triton's interpreter (CPU tensors) rather than compiled for CUDA."""
    kernel = _kernel()
    return kernel is not None and not isinstance(kernel, _STATE["triton"].runtime.JITFunction)


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernel can take ``x`` here: a CUDA tensor, or any tensor under the interpreter."""
    return available() and (x.is_cuda or interpreted())


@dataclass(frozen=True, eq=False)
class TritonPlan:
    """A packed layer's weights in the kernel's form, built once per layer and device by :func:`prepare`."""

    words: torch.Tensor  # int32 (ceil(K / per_word), N): per_word codes of `bits` bits each, k-major
    tables: torch.Tensor  # per plane (even, odd, even hi, odd hi): int64 register words, or int8/int16 entries
    col_scale: torch.Tensor  # float64 (N,): scale * unit
    bias: torch.Tensor | None  # float64 (N,)
    sqrt1_2: torch.Tensor  # float64 (1,): loaded, so no float32 literal rounds it
    bits: int
    per_word: int
    dot_int8: bool  # int8 x int8 -> int32 dots; else fp16 x fp16 -> fp32 per chunk
    has_odd: bool
    split: bool  # levels split into hi / lo fp16 digits
    register_table: bool  # codes of <= 4 bits: the table as 64-bit words in registers
    k: int
    n: int
    input: InputSpec
    conv: ConvGeometry | None  # a conv layer's geometry (None: linear)


def _dot_form(spec: LayerSpec, w_low: int, w_high: int) -> tuple[bool, bool] | None:
    """``(dot_int8, split)`` for the layer's activation range and level integers ``[w_low, w_high]``, or ``None``
    when no form is exact."""
    inp, fan_in = spec.input, spec.weight.fan_in
    x_max, w_max = max(-inp.qmin, inp.qmax), max(-w_low, w_high)
    if inp.qmin >= -128 and inp.qmax <= 127 and w_low >= -128 and w_high <= 127:
        return (True, False) if x_max * w_max * fan_in < 2**31 else None
    split = w_max > 2048 or x_max * w_max * BLOCK_K >= 2**24
    plane_max = min(w_max, SPLIT_BASE // 2) if split else w_max
    if x_max > 2048 or x_max * plane_max * BLOCK_K >= 2**24 or x_max * plane_max * fan_in >= 2**31:
        return None
    if split and x_max * (-(-w_max // SPLIT_BASE)) * fan_in >= 2**31:
        return None
    return False, split


def ineligible_reason(spec: LayerSpec) -> str | None:
    """Why the kernel cannot take this integer layer, or ``None``."""
    if spec.input.qmin > 0 or spec.input.qmax < 0:
        return "a zero input does not quantize to code 0"  # padding and masked k must add nothing
    if why := grouped_reason(spec):
        return why
    if _dot_form(spec, *_level_range(spec)) is None:
        return "no exact dot form for these activation and level ranges"
    return None


def _level_range(spec: LayerSpec) -> tuple[int, int]:
    even, odd = spec.lut.even, spec.lut.odd
    return int(min(even.min(), odd.min())), int(max(even.max(), odd.max()))


def triton_plan(spec: LayerSpec, device: torch.device) -> TritonPlan:
    """The plan of an eligible layer on ``device``."""
    weight, lut = spec.weight, spec.lut
    dot_int8, split = _dot_form(spec, *_level_range(spec))
    codes = weight.codes.reshape(weight.out_channels, -1)
    planes = [lut.even, lut.odd]
    if split:
        hi = [torch.round(p.double() / SPLIT_BASE).long() for p in planes]
        planes = [p - h * SPLIT_BASE for p, h in zip(planes, hi, strict=True)] + hi
    bits = weight.bits
    register_table = bits <= 4
    tables = _register_words(planes, 8 if dot_int8 else 16) if register_table else _entry_table(planes, bits, dot_int8)
    col_scale, bias = spec.rescale()
    return TritonPlan(
        words=_code_words(codes, bits).to(device),
        tables=tables.to(device),
        col_scale=col_scale.to(device),
        bias=None if spec.bias is None else bias.to(device),
        sqrt1_2=torch.tensor([SQRT1_2], dtype=torch.float64, device=device),
        bits=bits,
        per_word=32 // bits,
        dot_int8=dot_int8,
        has_odd=bool(lut.odd[codes].any()),  # as the reference: no odd sum where no weight is odd
        split=split,
        register_table=register_table,
        k=codes.shape[1],
        n=codes.shape[0],
        input=spec.input,
        conv=spec.geometry if isinstance(spec.geometry, ConvGeometry) else None,
    )


def _code_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``(N, K)`` as int32 words ``(ceil(K / per_word), N)``: code ``k`` of column ``n`` in bits
    ``[(k % per_word) * bits, ...)`` of word ``[k // per_word, n]``, ``per_word = 32 // bits``; K padded with 0."""
    n, k = codes.shape
    per_word = 32 // bits
    rows = -(-k // per_word)
    padded = torch.zeros(rows * per_word, n, dtype=torch.int64)
    padded[:k] = codes.T
    shifts = torch.arange(per_word, dtype=torch.int64).reshape(1, per_word, 1) * bits
    words = (padded.reshape(rows, per_word, n) << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _register_words(planes: list[torch.Tensor], entry_bits: int) -> torch.Tensor:
    """Tables of at most 16 entries as int64 ``(planes, 4)``: entry ``c`` in bits ``[(c % e) * entry_bits, ...)``
    of word ``c // e``, ``e = 64 / entry_bits`` entries per word (two's complement, zero-padded)."""
    per_word = 64 // entry_bits
    words = [[0] * 4 for _ in planes]
    for p, plane in enumerate(planes):
        for c, value in enumerate(plane.tolist()):
            words[p][c // per_word] |= (value & (2**entry_bits - 1)) << ((c % per_word) * entry_bits)
    signed = [[w - 2**64 if w >= 2**63 else w for w in row] for row in words]
    return torch.tensor(signed, dtype=torch.int64)


def _entry_table(planes: list[torch.Tensor], bits: int, dot_int8: bool) -> torch.Tensor:
    table = torch.zeros(len(planes), 2**bits, dtype=torch.int8 if dot_int8 else torch.int16)
    for p, plane in enumerate(planes):
        table[p, : plane.numel()] = plane.to(table.dtype)
    return table


class TritonBackend(Backend):
    """The Triton kernel: CUDA inputs (any input under the interpreter when the selection is ``triton``)."""

    name = "triton"
    modes = frozenset({"auto", "triton"})

    def takes(self, device: torch.device, dtype: torch.dtype, kernel: str) -> bool:
        if kernel == "auto":  # CPU inputs never import triton
            return device.type == "cuda" and available()
        return True

    def missing(self, device: torch.device) -> str | None:
        if available() and (device.type == "cuda" or interpreted()):
            return None
        return "kernel=triton needs triton and a CUDA tensor (or TRITON_INTERPRET=1 set before triton loads)"

    def eligible(self, spec: LayerSpec) -> str | None:
        return integer_reason(spec) or ineligible_reason(spec)

    def prepare(self, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> TritonPlan:
        return triton_plan(spec, device)

    def run(self, plan: TritonPlan, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor | None:
        """``None`` (the next backend runs) for inputs outside the kernel's exact forms."""
        if not runs_on(x) or x.dtype not in QUOTIENT_CODES or x.numel() == 0:
            return None
        quotient = torch.result_type(x, step)
        if step.dtype not in QUOTIENT_CODES or quotient not in QUOTIENT_CODES:
            return None
        if quotient != torch.float32 and not _representable(plan.input, quotient):
            return None
        if plan.conv is not None:
            return _conv_forward(plan, x, step, quotient)
        if x.numel() >= 2**31:  # the kernel's offsets are int32
            return None
        rows = x.reshape(-1, x.shape[-1])
        step_rows = step.expand(*x.shape[:-1], 1).reshape(-1) if step.numel() != 1 else step.reshape(1)
        y = lut_linear(rows, step_rows, plan, quotient)
        return y.reshape(*x.shape[:-1], plan.n).to(x.dtype)


def _representable(inp: InputSpec, dtype: torch.dtype) -> bool:
    """Whether qmin and qmax are exact in ``dtype`` (the reference clamps the half-precision quotient)."""
    bounds = torch.tensor([inp.qmin, inp.qmax], dtype=torch.float64)
    return torch.equal(bounds.to(dtype).double(), bounds)


def _conv_forward(plan: TritonPlan, x: torch.Tensor, step: torch.Tensor, quotient: torch.dtype) -> torch.Tensor | None:
    g = plan.conv
    batch, _, height, width = x.shape
    out_h, out_w = g.output_size(height, width)
    cols = F.unfold(x, g.kernel_size, dilation=g.dilation, padding=g.padding, stride=g.stride)
    if cols.numel() >= 2**31:  # the kernel's offsets are int32
        return None
    rows = cols.transpose(1, 2).reshape(batch * out_h * out_w, -1)  # one row per output pixel
    if step.numel() == 1:
        step_rows = step.reshape(1)
    else:  # one ASQ step per sample, repeated for its pixels
        step_rows = step.reshape(batch, 1).expand(batch, out_h * out_w).reshape(-1)
    y = lut_linear(rows, step_rows, plan, quotient)
    return y.view(batch, out_h, out_w, plan.n).permute(0, 3, 1, 2).to(x.dtype)


def lut_linear(
    rows: torch.Tensor, step_rows: torch.Tensor, plan: TritonPlan, quotient: torch.dtype = torch.float32
) -> torch.Tensor:
    """``y (m, n)`` for float rows ``(m, k)`` and steps ``(m,)`` or ``(1,)``: float32 for float32 rows, else float64
    (the caller rounds once to its dtype). ``quotient`` is the dtype ``rows / step`` rounds to in the reference.
    Runs the ``asqpost::triton_lut_linear`` custom op."""
    if rows.dim() != 2 or rows.shape[1] != plan.k:
        raise ValueError(f"rows must be (m, {plan.k}), got {tuple(rows.shape)}")
    if step_rows.numel() not in (1, rows.shape[0]):
        raise ValueError(f"step_rows must hold 1 or {rows.shape[0]} steps, got {step_rows.numel()}")
    tensors = (rows if rows.stride(1) == 1 else rows.contiguous(), step_rows.float().contiguous(), plan.words)
    tensors += (plan.tables, plan.col_scale, plan.col_scale if plan.bias is None else plan.bias, plan.sqrt1_2)
    flags = (plan.bits, plan.dot_int8, plan.has_odd, plan.split, plan.register_table, plan.bias is not None)
    ints = (plan.n, plan.input.qmin, plan.input.qmax, QUOTIENT_CODES[quotient])
    return torch.ops.asqpost.triton_lut_linear(*tensors, *flags, *ints)


def _launch(rows, steps, words, tables, col_scale, bias, sqrt1_2, bits, dot_int8, has_odd, split, register_table,
            has_bias, n, qmin, qmax, quotient):  # fmt: skip
    m, k = rows.shape
    y = torch.empty(m, n, device=rows.device, dtype=torch.float32 if rows.dtype == torch.float32 else torch.float64)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 32 if m <= 16 else 64
    entry_bits = 8 if dot_int8 else 16
    table_words = -(-(2**bits) // (64 // entry_bits)) if register_table else 0
    _kernel()[(-(-m // block_m), -(-n // block_n))](
        rows, steps, words, tables, col_scale, bias, sqrt1_2, y, m, n, k, rows.stride(0),
        0 if steps.numel() == 1 else 1, qmin, qmax, bits=bits, per_word=32 // bits, register_table=register_table,
        entry_bits=entry_bits, table_words=table_words, table_stride=tables.shape[1], dot_int8=dot_int8,
        has_odd=has_odd, split=split, has_bias=has_bias, quotient=quotient, block_m=block_m, block_n=block_n,
        block_k=BLOCK_K,
        enable_fp_fusion=False,  # the float64 rescale rounds each operation as the reference does
    )  # fmt: skip
    return y


def _launch_fake(rows, steps, words, tables, col_scale, bias, sqrt1_2, *flags_and_ints):
    n = flags_and_ints[6]  # after bits, dot_int8, has_odd, split, register_table, has_bias
    return rows.new_empty((rows.shape[0], n), dtype=torch.float32 if rows.dtype == torch.float32 else torch.float64)


def _register_op() -> torch.library.Library:
    library = torch.library.Library("asqpost", "FRAGMENT")
    library.define(
        "triton_lut_linear(Tensor rows, Tensor steps, Tensor words, Tensor tables, Tensor col_scale, Tensor bias, "
        "Tensor sqrt1_2, int bits, bool dot_int8, bool has_odd, bool split, bool register_table, bool has_bias, "
        "int n, int qmin, int qmax, int quotient) -> Tensor"
    )
    for device in ("CPU", "CUDA"):  # CPU: under Triton's interpreter
        library.impl("triton_lut_linear", _launch, device)
    torch.library.register_fake("asqpost::triton_lut_linear", _launch_fake, lib=library)
    return library


# once per process (a module imported again finds it: the dispatcher keeps the first library alive)
_LIBRARY = None if hasattr(torch.ops.asqpost, "triton_lut_linear") else _register_op()


def _kernel() -> Any | None:
    """The jitted kernel (``None`` without triton): built on first use, interpreted if TRITON_INTERPRET is set."""
    if "kernel" not in _STATE:
        try:
            import triton
            import triton.language
        except ImportError:
            _STATE["kernel"] = None
            return None
        global tl
        tl = triton.language
        helpers = {name: triton.jit(globals()[name]) for name in ("_quantize", "_lookup", "_accumulate")}
        globals().update(helpers)
        _STATE["triton"] = triton
        _STATE["kernel"] = triton.jit(_lut_kernel)
    return _STATE["kernel"]


# The kernel and its helpers: plain functions until _kernel() jits them (they read `tl` from this module).


def _quantize(x, step, qmin, qmax, valid, quotient: tl.constexpr, dot_int8: tl.constexpr):
    """Activation codes (int8 or fp16) of a float tile and a NaN mark per element (the reference's ops: IEEE
    ``x / step`` rounded to the quotient dtype, round half to even, clamp; clamping first is the same)."""
    q = tl.math.div_rn(x.to(tl.float32), step[:, None])
    if quotient == 1:
        q = q.to(tl.float16).to(tl.float32)
    nan = (q != q) & valid
    if quotient == 2:  # round to bfloat16 (nearest even) in the bits: the interpreter's cast truncates
        bits = q.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        q = bits.to(tl.float32, bitcast=True)
    q = tl.where(valid & (q == q), q, 0.0)
    q = tl.minimum(tl.maximum(q, qmin), qmax)
    low = tl.math.floor(q)
    frac = q - low
    low_is_odd = (low - 2.0 * tl.math.floor(low * 0.5)) != 0.0
    q = tl.where((frac > 0.5) | ((frac == 0.5) & low_is_odd), low + 1.0, low)
    codes = q.to(tl.int8) if dot_int8 else q.to(tl.float16)
    return codes, nan.to(tl.int32)


def _lookup(
    codes,
    table_ptr,
    register_table: tl.constexpr,
    entry_bits: tl.constexpr,
    table_words: tl.constexpr,
    dot_int8: tl.constexpr,
):
    """The level integers of a code tile, as the dot's operand dtype."""
    if register_table:
        per_word: tl.constexpr = 64 // entry_bits
        slot = codes // per_word
        word = tl.load(table_ptr) + tl.zeros(codes.shape, dtype=tl.int64)
        if table_words > 1:
            word = tl.where(slot == 1, tl.load(table_ptr + 1), word)
        if table_words > 2:
            word = tl.where(slot == 2, tl.load(table_ptr + 2), word)
            word = tl.where(slot == 3, tl.load(table_ptr + 3), word)
        raw = word >> ((codes % per_word) * entry_bits).to(tl.int64)
    else:
        raw = tl.load(table_ptr + codes)
    levels = raw.to(tl.int8) if dot_int8 else raw.to(tl.int16).to(tl.float16)
    return levels


def _accumulate(acc, a, b, dot_int8: tl.constexpr):
    """``acc + a @ b`` exactly: int8 dots accumulate in int32; fp16 dots sum one chunk in float32 (exact under the
    module's bound) and carry it in int32."""
    acc = tl.dot(a, b, acc, out_dtype=tl.int32) if dot_int8 else acc + tl.dot(a, b, out_dtype=tl.float32).to(tl.int32)
    return acc


def _lut_kernel(
    x_ptr,
    step_ptr,
    words_ptr,
    table_ptr,
    col_scale_ptr,
    bias_ptr,
    sqrt1_2_ptr,
    y_ptr,
    m,
    n,
    k,
    stride_xm,
    stride_step,
    qmin,
    qmax,
    bits: tl.constexpr,
    per_word: tl.constexpr,
    register_table: tl.constexpr,
    entry_bits: tl.constexpr,
    table_words: tl.constexpr,
    table_stride: tl.constexpr,
    dot_int8: tl.constexpr,
    has_odd: tl.constexpr,
    split: tl.constexpr,
    has_bias: tl.constexpr,
    quotient: tl.constexpr,
    block_m: tl.constexpr,
    block_n: tl.constexpr,
    block_k: tl.constexpr,
):
    rows = tl.program_id(0) * block_m + tl.arange(0, block_m)
    cols = tl.program_id(1) * block_n + tl.arange(0, block_n)
    row_ok = rows < m
    col_ok = cols < n
    step = tl.load(step_ptr + rows * stride_step, mask=row_ok, other=1.0)
    acc_even = tl.zeros((block_m, block_n), dtype=tl.int32)
    acc_odd = tl.zeros((block_m, block_n), dtype=tl.int32)
    acc_even_hi = tl.zeros((block_m, block_n), dtype=tl.int32)
    acc_odd_hi = tl.zeros((block_m, block_n), dtype=tl.int32)
    nan_rows = tl.zeros((block_m,), dtype=tl.int32)
    for k0 in range(0, k, block_k):
        ks = k0 + tl.arange(0, block_k)
        k_ok = ks < k
        valid = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=valid, other=0.0)
        a, nan = _quantize(x, step, qmin, qmax, valid, quotient, dot_int8)
        nan_rows = tl.maximum(nan_rows, tl.max(nan, axis=1))
        words = tl.load(words_ptr + (ks // per_word)[:, None] * n + cols[None, :], mask=k_ok[:, None] & col_ok[None, :])
        codes = (words >> ((ks % per_word) * bits)[:, None]) & ((1 << bits) - 1)
        w = _lookup(codes, table_ptr, register_table, entry_bits, table_words, dot_int8)
        acc_even = _accumulate(acc_even, a, w, dot_int8)
        if has_odd:
            w = _lookup(codes, table_ptr + table_stride, register_table, entry_bits, table_words, dot_int8)
            acc_odd = _accumulate(acc_odd, a, w, dot_int8)
        if split:
            w = _lookup(codes, table_ptr + 2 * table_stride, register_table, entry_bits, table_words, dot_int8)
            acc_even_hi = _accumulate(acc_even_hi, a, w, dot_int8)
            if has_odd:
                w = _lookup(codes, table_ptr + 3 * table_stride, register_table, entry_bits, table_words, dot_int8)
                acc_odd_hi = _accumulate(acc_odd_hi, a, w, dot_int8)
    # the rescale in float64, operation by operation as the reference: acc * (scale * unit) * s_a + bias
    acc = acc_even.to(tl.float64)
    if split:
        acc = acc + acc_even_hi.to(tl.float64) * 1024.0  # SPLIT_BASE
    if has_odd:
        odd = acc_odd.to(tl.float64)
        if split:
            odd = odd + acc_odd_hi.to(tl.float64) * 1024.0
        acc = acc + odd * tl.load(sqrt1_2_ptr)
    col_scale = tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0)
    y = acc * col_scale[None, :] * step.to(tl.float64)[:, None]
    if has_bias:
        y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    y = tl.where(nan_rows[:, None] > 0, float("nan"), y)
    tl.store(
        y_ptr + rows[:, None] * n + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :]
    )
