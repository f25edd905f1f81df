"""ASQ (arXiv 2504.17263): LSQ for activations with a per-sample step ``s * beta(x)``."""

from __future__ import annotations

import dataclasses

import torch

from ..adapters import StepAdapter
from ..config import QuantizerConfig
from ..functional import fake_quantize
from ..registry import register_quantizer
from .base import ActExport
from .lsq import LSQQuantizer


@register_quantizer("asq")
class ASQQuantizer(LSQQuantizer):
    """``x_int = clamp(round(x / (s * beta)), qmin, qmax)``, ``x_hat = x_int * s * beta``.

    ``beta = adapter(x)`` is one positive factor per sample (per token with ``per_token``), shaped to
    broadcast against ``x``. LSQ's gradient scale applies to ``s`` only, so ``ds = beta * dx_hat/ds_a``
    (scaled) and ``dbeta = s * dx_hat/ds_a`` (method.md). With beta = 1 this is exactly :class:`LSQQuantizer`.
    """

    roles = ("act",)
    label = "ASQ"

    def __init__(self, config: QuantizerConfig, role: str, *, channels: int | None = None, **_: object):
        super().__init__(config, role, channels=channels)
        assert channels is not None
        self.adapter = StepAdapter(channels, positive=config.adapter, per_token=config.per_token)

    def beta(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        step_a = self.scaled_step(x) * self.beta(x)  # s_a = s * beta, one per sample
        return fake_quantize(x, step_a, qmin, qmax)

    def export_act(self) -> ActExport:
        return dataclasses.replace(super().export_act(), adapter=self.adapter)
