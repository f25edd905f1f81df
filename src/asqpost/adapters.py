"""The ASQ step adapter: activation statistics -> a positive per-sample factor ``beta``.

Paper (arXiv 2504.17263, ASQ): ``beta = positive(W2 relu(W1 GAP(x) + b1) + b2)``, with ``W1: C -> C/4`` and
``W2: C/4 -> 1`` (a single ``C -> 1`` linear when ``C < 8``). The last layer starts with weights
``N(0, 0.01)`` and a bias chosen so that ``beta`` is 1 at the start.

``positive`` is ``softplus`` by default: its gradient never vanishes, so an adapter cannot "die". The paper's
public code uses ``relu`` clamped at 1e-8, which kills a sample's output for good once its pre-activation
goes negative; it stays available as ``positive="relu"`` (``"exp"`` is a third option).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

POSITIVE_MAPS = ("softplus", "exp", "relu")
RELU_FLOOR = 1e-8


def _positive(z: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "softplus":
        return F.softplus(z)
    if kind == "exp":
        return torch.exp(z)
    return torch.clamp(F.relu(z), min=RELU_FLOOR)


def _bias_for_unit_beta(kind: str) -> float:
    """The pre-activation ``z`` with ``positive(z) = 1``."""
    return {"softplus": math.log(math.e - 1.0), "exp": 0.0, "relu": 1.0}[kind]


class StepAdapter(nn.Module):
    """Per-sample step multiplier ``beta > 0`` from a layer input's channel means.

    Input ``x``: ``(N, C, H, W)`` (pooled over H, W), ``(N, C)``, or ``(N, T, C)`` (pooled over T, or one
    beta per token with ``per_token=True``). Output: ``beta`` shaped to broadcast against ``x``:
    ``(N, 1, 1, 1)``, ``(N, 1)``, ``(N, 1, 1)`` or ``(N, T, 1)``.
    """

    def __init__(self, channels: int, reduction: int = 4, positive: str = "softplus", per_token: bool = False):
        super().__init__()
        if positive not in POSITIVE_MAPS:
            raise ValueError(f"unknown adapter positive map {positive!r}; choose one of {POSITIVE_MAPS}")
        if channels < 1:
            raise ValueError(f"adapter needs at least one channel, got {channels}")
        self.channels = channels
        self.positive = positive
        self.per_token = per_token
        hidden = channels // reduction
        if channels < 8 or hidden < 1:
            self.hidden = None
            self.out = nn.Linear(channels, 1)
        else:
            self.hidden = nn.Linear(channels, hidden)
            self.out = nn.Linear(hidden, 1)
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.constant_(self.out.bias, _bias_for_unit_beta(positive))

    def statistics(self, x: torch.Tensor) -> torch.Tensor:
        """Channel means: ``(N, C)``, or ``(N, T, C)`` per token."""
        if x.dim() == 4:
            return x.mean(dim=(2, 3))
        if x.dim() == 3 and not self.per_token:
            return x.mean(dim=1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_dim = 1 if x.dim() == 4 else -1
        if x.dim() not in (2, 3, 4) or x.shape[channel_dim] != self.channels:
            raise ValueError(
                f"StepAdapter({self.channels}) expects (N, C, H, W), (N, C) or (N, T, C) with C = "
                f"{self.channels}, got shape {tuple(x.shape)}"
            )
        out = self.out
        z = self.statistics(x)
        if z.dtype != out.weight.dtype:  # a float64 or half input into a float32 adapter
            z = z.to(out.weight.dtype)
        # F.linear on the layers' parameters: the same maths as calling them, without the module-call overhead
        # that dominates these tiny layers at batch 1
        if self.hidden is not None:
            z = F.relu(F.linear(z, self.hidden.weight, self.hidden.bias))
        beta = _positive(F.linear(z, out.weight, out.bias), self.positive)  # (N, 1) or (N, T, 1)
        return beta.reshape(beta.shape + (1,) * (x.dim() - beta.dim()))
