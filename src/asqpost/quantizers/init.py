"""Scale initialisation by search: the scale that minimises the squared quantization error.

Shared by LSQ (integer grid) and level-set quantizers, so that comparisons between grids start alike.
"""

from __future__ import annotations

import torch

from ..functional import Rounder

FRACTIONS = torch.linspace(0.02, 1.0, 50).tolist()
SAMPLE_LIMIT = 1 << 18


@torch.no_grad()
def mse_scale(rows: torch.Tensor, rounder: Rounder, lo: float, hi: float) -> torch.Tensor:
    """Per-row scale ``s`` minimising ``||rounder(clamp(x / s, lo, hi)) * s - x||^2``.

    ``rows``: ``(R, K)``. Candidates: ``s = f * max|x| / max(|lo|, |hi|)`` for f in (0, 1]. Returns ``(R,)``.
    """
    top = max(abs(lo), abs(hi))
    peak = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / top
    best_err = torch.full_like(peak, float("inf"))
    best = peak.clone()
    for frac in FRACTIONS:
        scale = peak * frac
        err = (rounder((rows / scale).clamp(lo, hi)) * scale - rows).pow(2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best.squeeze(1)


@torch.no_grad()
def percentile_scale(rows: torch.Tensor, hi: float, q: float = 0.99) -> torch.Tensor:
    """Per-row scale that puts the ``q`` quantile of ``|x|`` on the top level ``hi``."""
    return torch.quantile(rows.abs(), q, dim=1) / abs(hi)


def subsample(x: torch.Tensor, limit: int = SAMPLE_LIMIT) -> torch.Tensor:
    """A flat random subset of at most ``limit`` elements (calibration statistics for activations)."""
    flat = x.detach().reshape(-1).float()
    if flat.numel() <= limit:
        return flat
    return flat[torch.randint(flat.numel(), (limit,), device=flat.device)]
