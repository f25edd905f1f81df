"""ASQ (arXiv 2504.17263): LSQ for activations with a per-sample step ``s * beta(x)``."""

from __future__ import annotations

import torch

from ..adapters import StepAdapter
from ..config import QuantizerConfig
from ..functional import fake_quantize
from .base import register_quantizer
from .lsq import LSQQuantizer


@register_quantizer("asq")
class ASQQuantizer(LSQQuantizer):
    """``x_int = clamp(round(x / (s * beta)), qmin, qmax)``, ``x_hat = x_int * s * beta``.

    ``beta = adapter(x)`` is one positive factor per sample (per token with ``per_token``), shaped to
    broadcast against ``x``. LSQ's gradient scale applies to ``s`` only, so ``ds = beta * dx_hat/ds_a``
    (scaled) and ``dbeta = s * dx_hat/ds_a`` (method.md). With beta = 1 this is exactly :class:`LSQQuantizer`.
    """

    roles = ("act",)

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

    def export_params(self) -> dict[str, torch.Tensor]:
        params = super().export_params()
        params.update({f"adapter.{k}": v.detach() for k, v in self.adapter.state_dict().items()})
        return params
