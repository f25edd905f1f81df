"""Pure fake-quantization ops with straight-through gradients.

Every quantizer in the package is one instance of

    x_hat = Q(clamp(x / s, lo, hi)) * s

where ``s`` is a step (broadcastable to ``x``: a scalar, one per channel, or one per sample as in ASQ) and
``Q`` rounds to the grid: ``torch.round`` for LSQ's integer grid, nearest level for a :class:`LevelSet`.
With the straight-through estimator (Esser et al., LSQ, ICLR 2020; the paper's eq. for ASQ):

    dx_hat/dx = 1 inside [lo, hi], 0 outside
    dx_hat/ds = Q(v) - v inside, lo below, hi above       (v = x / s)

which is ``Q(clamp(v)) - v * inside``. :func:`fake_quantize` computes this in one autograd node that saves
only ``x`` and ``s``; :func:`fake_quantize_reference` is the same maths in plain autograd (the oracle). On
float32 CPU tensors whose step is one value or one per leading index (a channel, a sample, a token), the node runs
the C++ extension's fused pass each way (:mod:`asqpost.cpp`): the same float32 operations, so the same outputs and
``x`` gradients; the step gradient is summed in float64 (within float32 rounding of torch's sum).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .cpp import extension
from .levels import LevelSet

Rounder = Callable[[torch.Tensor], torch.Tensor]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return (x.round() - x).detach() + x


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):  # type: ignore[override]
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` forward (bit-exact), gradient multiplied by ``scale`` backward (LSQ's step-gradient scale)."""
    return _GradScale.apply(x, float(scale))


def lsq_grad_scale(numel_per_step: int, qmax: float) -> float:
    """LSQ's gradient scale ``1 / sqrt(qmax * N)``; N = elements that share one step."""
    return 1.0 / max(qmax * numel_per_step, 1.0) ** 0.5


def sum_to_shape(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dimensions that ``shape`` broadcast (the reverse of broadcasting)."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1]
    return t.sum(dim=dims, keepdim=True).reshape(shape)


_NO_TABLE = torch.empty(0)


def _fused(x: torch.Tensor, step: torch.Tensor) -> Any | None:
    """The extension, where its fused op takes ``x`` and ``step`` (float32 CPU, ``x`` contiguous, the step one value
    or one per leading index of ``x``) outside ``torch.compile``; else ``None``."""
    if x.dtype != torch.float32 or step.dtype != torch.float32 or not (x.is_cpu and step.is_cpu) or x.numel() == 0:
        return None
    if not x.is_contiguous() or torch.compiler.is_compiling():
        return None
    if step.numel() != 1:
        if step.dim() != x.dim():
            return None
        lead = next((i for i, n in enumerate(step.shape) if n != x.shape[i]), step.dim())
        if lead == 0 or any(n != 1 for n in step.shape[lead:]):
            return None
    return extension()


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, lo, hi, rounder, levels, native):  # type: ignore[override]
        ctx.save_for_backward(x, step)
        ctx.bounds = (lo, hi, rounder)
        ctx.native = native
        if native is not None:
            ctx.tables = (_NO_TABLE, _NO_TABLE) if levels is None else (levels.table(), levels.midpoints())
            return native.fake_quant_forward(x, step.contiguous(), lo, hi, *ctx.tables)
        return rounder((x / step).clamp_(lo, hi)).mul_(step)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, step = ctx.saved_tensors
        lo, hi, rounder = ctx.bounds
        if ctx.native is not None and grad_out.dtype == torch.float32 and grad_out.is_cpu:
            grad_x, grad_step = ctx.native.fake_quant_backward(
                grad_out.contiguous(), x, step.contiguous(), lo, hi, *ctx.tables, ctx.needs_input_grad[1]
            )
            grad_step = grad_step.reshape(step.shape) if ctx.needs_input_grad[1] else None
            return grad_x, grad_step, None, None, None, None, None
        v = x / step
        inside = (v >= lo) & (v <= hi)
        grad_x = grad_out * inside
        grad_step = None
        if ctx.needs_input_grad[1]:
            # dx_hat/ds = Q(clamp(v)) - v * inside
            q = rounder(v.clamp(lo, hi))
            grad_step = sum_to_shape(grad_out * q - grad_x * v, step.shape)
        return grad_x, grad_step, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    step: torch.Tensor,
    lo: float,
    hi: float,
    rounder: Rounder = torch.round,
    levels: LevelSet | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """``rounder(clamp(x / step, lo, hi)) * step`` with straight-through gradients for ``x`` and ``step``.

    Shapes: ``x`` any; ``step`` broadcastable to ``x`` (e.g. ``()``, ``(C, 1, 1, 1)``, ``(N, 1, 1, 1)``).
    The step gradient is reduced to ``step``'s shape; apply :func:`grad_scale` to ``step`` beforehand.
    ``levels``: round to the nearest of these levels (``rounder`` is then ``levels.project``). ``fused=False``
    keeps to torch ops (the extension's fused pass is otherwise taken where it applies; see the module docstring).
    """
    rounder = rounder if levels is None else levels.project
    native = _fused(x, step) if fused else None
    return _FakeQuantize.apply(x, step, float(lo), float(hi), rounder, levels, native)


def fake_quantize_reference(
    x: torch.Tensor, step: torch.Tensor, lo: float, hi: float, rounder: Rounder = torch.round
) -> torch.Tensor:
    """Plain-autograd version of :func:`fake_quantize` (slower, used as the test oracle)."""
    v = torch.clamp(x / step, lo, hi)
    return ((rounder(v) - v).detach() + v) * step
