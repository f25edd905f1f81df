"""Level-set weight quantizers: every grid of :data:`asqpost.levels.GRIDS` times a learned per-channel scale.

Each grid is registered as a weight method of the same name and label, so a new grid is one entry in
:mod:`asqpost.levels`.
"""

from __future__ import annotations

import torch

from ..config import QuantizerConfig
from ..functional import Rounder, fake_quantize, grad_scale, lsq_grad_scale
from ..levels import GRIDS, make_levels
from ..registry import register_quantizer
from .base import Quantizer, WeightExport


class LevelSetQuantizer(Quantizer):
    """``w_hat = alpha * nearest_level(clamp(w / alpha, -1, 1))`` with one ``alpha`` per output channel.

    The grid is the config's method (see :mod:`asqpost.levels`; ``post`` is the paper's powers of sqrt 2).
    Straight-through gradient for ``w``; ``alpha`` (the base class's ``scale``) gets the LSQ-like gradient
    ``level - w/alpha`` inside the range and ``+-1`` outside, scaled by ``1 / sqrt(N)`` (N weights per
    channel: LSQ's rule with the grid's top level, 1, as ``qmax``).
    """

    roles = ("weight",)

    def __init__(self, config: QuantizerConfig, role: str, *, weight_shape: torch.Size | None = None, **_: object):
        super().__init__(config, role, weight_shape)
        self.levels = make_levels(config.method, config.bits, signed=True)

    def grid(self) -> tuple[Rounder, float, float]:
        return self.levels.project, self.levels.lo, self.levels.hi

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        scale = grad_scale(self.scale, lsq_grad_scale(w.numel() // self.raw_scale.numel(), 1.0))
        return fake_quantize(w, scale, self.levels.lo, self.levels.hi, levels=self.levels)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Level indices (int64) of ``w``: what an export packs."""
        return self.levels.encode((w / self.scale).clamp(self.levels.lo, self.levels.hi))

    @torch.no_grad()
    def export_weight(self, w: torch.Tensor) -> WeightExport:
        return WeightExport(self.codes(w), self.levels.table(dtype=torch.float64), self.scale.detach().reshape(-1))


def _register_grids() -> None:
    for name, grid in GRIDS.items():
        register_quantizer(name, label=grid.label)(LevelSetQuantizer)


_register_grids()
