"""ASQ (arXiv 2504.17263): LSQ for activations with a per-sample step ``s * beta(x)``."""

from __future__ import annotations

import dataclasses

import torch

from ..adapters import StepAdapter
from ..config import QuantizerConfig
from ..functional import fake_quantize
from ..masking import valid_tokens
from ..registry import register_quantizer
from .base import ActExport
from .lsq import LSQQuantizer


@register_quantizer("asq")
class ASQQuantizer(LSQQuantizer):
    """``x_int = clamp(round(x / (s * beta)), qmin, qmax)``, ``x_hat = x_int * s * beta``.

    ``beta = adapter(x)`` is one positive factor per sample (per token with ``per_token``), shaped to
    broadcast against ``x``. LSQ's gradient scale applies to ``s`` only, so ``ds = beta * dx_hat/ds_a``
    (scaled) and ``dbeta = s * dx_hat/ds_a`` (docs/method.md). With beta = 1 this is exactly :class:`LSQQuantizer`.

    The step ``s`` is initialised as LSQ's (``init``: ``lsq``, ``mse`` or ``percentile``), searched on ``x`` with
    ``beta = 1``. With ``adapter_form="scale"`` calibration also sets the adapter's ``r_ref`` to the mean of
    ``r(x)`` over the calibration samples (tokens, with ``per_token``), so ``beta`` is about 1 on them. With
    ``normalise_init`` as well (``beta = (r(x) / r_ref) * mlp``, the MLP factor 1 at the start: the quantizer
    applies the step ``s * r(x) / r_ref`` to each sample or token) the search runs on the normalised inputs
    ``x / r(x)`` (real tokens only under a token mask) and ``s`` is the fitted step times ``r_ref``: ``s * beta``
    at ``r(x) = r_ref`` is the fitted step, and every sample's codes are those of the fit on its normalised
    input.
    """

    roles = ("act",)
    label = "ASQ"

    def __init__(self, config: QuantizerConfig, role: str, *, channels: int | None = None, **_: object):
        super().__init__(config, role, channels=channels)
        assert channels is not None
        self.adapter = StepAdapter(
            channels,
            reduction=config.adapter_reduction,
            positive=config.adapter,
            per_token=config.per_token,
            form=config.adapter_form,
            hidden_size=config.adapter_hidden,
        )
        self.normalise_init = config.normalise_init

    def _reset_observations(self) -> None:
        super()._reset_observations()
        self._r_sum = 0.0
        self._r_count = 0

    @torch.no_grad()
    def observe_(self, x: torch.Tensor) -> None:
        """LSQ's statistics (of ``x / r(x)`` with ``normalise_init``); with the scale-following adapter, plus the
        sum of ``r(x)``.

        Under a token mask, ``r`` of a sample is over its real tokens, and per token only real tokens count.
        """
        if self.adapter.form != "scale":
            super().observe_(x)
            return
        r = self.adapter.input_scale(x)  # (N, 1) or, per token, (N, T, 1)
        super().observe_(x / r.reshape(r.shape + (1,) * (x.dim() - r.dim())) if self.normalise_init else x)
        if r.dim() == 3:
            r = valid_tokens(r)
        self._r_sum += float(r.double().sum())
        self._r_count += r.numel()

    @torch.no_grad()
    def finalize_(self) -> None:
        """LSQ's step initialisation (``self.init``); the scale-following adapter's ``r_ref = mean r(x)`` (and with
        ``normalise_init`` the step fitted to ``x / r(x)`` times ``r_ref``)."""
        r_ref = self._r_sum / self._r_count if self._r_count else None
        super().finalize_()
        if r_ref is not None:
            self.adapter.set_reference_scale_(r_ref)
            if self.normalise_init:
                self.raw_scale.mul_(self.adapter.r_ref)
                self._projection.clear()

    def beta(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        step_a = self.scaled_step(x) * self.beta(x)  # s_a = s * beta, one per sample
        return fake_quantize(x, step_a, qmin, qmax)

    def export_act(self) -> ActExport:
        return dataclasses.replace(super().export_act(), adapter=self.adapter)
