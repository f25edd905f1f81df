"""Pure fake-quantization ops with straight-through gradients.

Every quantizer in the package is one instance of

    x_hat = Q(clamp(x / s, lo, hi)) * s

where ``s`` is a step (broadcastable to ``x``: a scalar, one per channel, or one per sample as in ASQ) and
``Q`` rounds to the grid: ``torch.round`` for LSQ's integer grid, nearest level for a :class:`LevelSet`.
With the straight-through estimator (Esser et al., LSQ, ICLR 2020; the paper's eq. for ASQ):

    dx_hat/dx = 1 inside [lo, hi], 0 outside
    dx_hat/ds = Q(v) - v inside, lo below, hi above       (v = x / s)

which is ``Q(clamp(v)) - v * inside``. :func:`fake_quantize` computes this in one autograd node that saves
only ``x`` and ``s``; :func:`fake_quantize_reference` is the same maths in plain autograd (the oracle).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, lo, hi, rounder):  # type: ignore[override]
        ctx.save_for_backward(x, step)
        ctx.bounds = (lo, hi, rounder)
        return rounder((x / step).clamp_(lo, hi)).mul_(step)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, step = ctx.saved_tensors
        lo, hi, rounder = ctx.bounds
        v = x / step
        inside = (v >= lo) & (v <= hi)
        grad_x = grad_out * inside
        grad_step = None
        if ctx.needs_input_grad[1]:
            # dx_hat/ds = Q(clamp(v)) - v * inside
            q = rounder(v.clamp(lo, hi))
            grad_step = sum_to_shape(grad_out * q - grad_x * v, step.shape)
        return grad_x, grad_step, None, None, None


def fake_quantize(
    x: torch.Tensor, step: torch.Tensor, lo: float, hi: float, rounder: Rounder = torch.round
) -> torch.Tensor:
    """``rounder(clamp(x / step, lo, hi)) * step`` with straight-through gradients for ``x`` and ``step``.

    Shapes: ``x`` any; ``step`` broadcastable to ``x`` (e.g. ``()``, ``(C, 1, 1, 1)``, ``(N, 1, 1, 1)``).
    The step gradient is reduced to ``step``'s shape; apply :func:`grad_scale` to ``step`` beforehand.
    """
    return _FakeQuantize.apply(x, step, float(lo), float(hi), rounder)


def fake_quantize_reference(
    x: torch.Tensor, step: torch.Tensor, lo: float, hi: float, rounder: Rounder = torch.round
) -> torch.Tensor:
    """Plain-autograd version of :func:`fake_quantize` (slower, used as the test oracle)."""
    v = torch.clamp(x / step, lo, hi)
    return ((rounder(v) - v).detach() + v) * step
