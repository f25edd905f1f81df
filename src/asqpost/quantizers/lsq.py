"""LSQ (Esser et al., ICLR 2020): a uniform quantizer with a learned step and a scaled step gradient."""

from __future__ import annotations

from typing import Any

import torch

from ..config import QuantizerConfig
from ..functional import Rounder, fake_quantize, grad_scale, lsq_grad_scale
from ..registry import register_quantizer
from .base import ActExport, Quantizer, WeightExport


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """LSQ's ranges: ``[-2^(b-1), 2^(b-1) - 1]`` signed, ``[0, 2^b - 1]`` unsigned."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@register_quantizer("lsq")
class LSQQuantizer(Quantizer):
    """``x_hat = clamp(round(x / s), qmin, qmax) * s``; ``s = step`` (the base class's ``scale``).

    Weights: one step per output channel, always signed. Activations: one step per tensor; signed or unsigned
    from the config, or decided at calibration when ``signed`` is None. Step gradient scale
    ``1 / sqrt(qmax * N)`` with N the number of elements sharing a step.
    """

    roles = ("weight", "act")
    inits = ("lsq", "mse", "percentile")
    label = "LSQ"

    def __init__(
        self,
        config: QuantizerConfig,
        role: str,
        *,
        channels: int | None = None,
        weight_shape: torch.Size | None = None,
    ):
        super().__init__(config, role, weight_shape)
        self.signed: bool | None = True if role == "weight" else config.signed

    @property
    def step(self) -> torch.Tensor:
        return self.scale

    @property
    def qrange(self) -> tuple[int, int]:
        if self.signed is None:
            raise RuntimeError("signedness is decided at calibration; calibrate first")
        return integer_range(self.bits, self.signed)

    def grid(self) -> tuple[Rounder, float, float]:
        qmin, qmax = self.qrange
        return torch.round, qmin, qmax

    def _decide_range(self, observed_min: float) -> None:
        if self.signed is None:
            self.signed = observed_min < 0

    def scaled_step(self, x: torch.Tensor) -> torch.Tensor:
        """The step with LSQ's gradient scale applied (forward value unchanged)."""
        step = self.step
        return grad_scale(step, lsq_grad_scale(x.numel() // step.numel(), self.qrange[1]))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        return fake_quantize(x, self.scaled_step(x), qmin, qmax)

    @torch.no_grad()
    def export_weight(self, w: torch.Tensor) -> WeightExport:
        """Codes ``q - qmin`` into the table ``qmin .. qmax`` (the integer grid), scaled by the step."""
        qmin, qmax = self.qrange
        q = torch.clamp(torch.round(w / self.step), qmin, qmax)
        table = torch.arange(qmin, qmax + 1, dtype=torch.float64)
        return WeightExport((q - qmin).long(), table, self.step.detach().reshape(-1))

    def export_act(self) -> ActExport:
        qmin, qmax = self.qrange
        return ActExport(qmin, qmax, self.step.detach())

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "signed": self.signed}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.signed = state["signed"]
