"""The ASQ step adapter: activation statistics -> a positive per-sample factor ``beta``.

Two forms, chosen by ``form`` (``QuantizerConfig.adapter_form``):

``"paper"`` (arXiv 2504.17263, ASQ; ``StepAdapter``'s default, so exports made before the scale form load as
they were; configs default to ``"scale"``, see ``QuantizerConfig.adapter_form``)::

    beta = positive(W2 relu(W1 m(x) + b1) + b2)

with ``m(x)`` the channel means (global average pooling), ``W1: C -> C/4`` and ``W2: C/4 -> 1`` (a single
``C -> 1`` linear when ``C < 8``). The last layer starts with weights ``N(0, 0.01)`` and a bias chosen so
that ``beta`` is 1 at the start. Nothing ties ``beta`` to the input's scale: it moves only as far as
training teaches it to.

``"scale"`` (scale-following)::

    r(x) = max(mean |x|, R_FLOOR)                      over channels and positions (per token: channels)
    beta = (r(x) / r_ref) ** gamma * positive(mlp(m(x) / r(x)))

``mlp`` is the paper form's network, initialised the same way (so ``positive(mlp(.)) = 1`` at the start,
up to the ``N(0, 0.01)`` last weights), fed with the channel means divided by ``r(x)``; ``r_ref`` is a
buffer that calibration sets to the mean of ``r`` over the calibration inputs (1 before); ``gamma`` is a
learned scalar that starts at 1. Because ``m(k x) / r(k x) = m(x) / r(x)`` for any gain ``k > 0``, this
``beta`` is positively homogeneous of degree ``gamma``: ``beta(k x) = k ** gamma * beta(x)`` at every point
of training (up to float rounding, and while ``r`` stays above the floor), so with ``gamma = 1`` the
activation step ``s * beta`` follows the input's gain exactly and ``x / (s * beta)`` does not change with it.
Training can still learn ``gamma`` and shape-dependent corrections through the MLP. ``R_FLOOR`` (1e-12)
keeps an all-zero input finite: its ``beta`` is tiny but positive and its codes are 0 either way.

``positive`` is ``softplus`` by default: its gradient never vanishes, so an adapter cannot "die". The paper's
public code uses ``relu`` clamped at 1e-8, which kills a sample's output for good once its pre-activation
goes negative; it stays available as ``positive="relu"`` (``"exp"`` is a third option).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cpp import extension
from .masking import mask_for, token_count, token_mean, token_sum

POSITIVE_MAPS = ("softplus", "exp", "relu")
ADAPTER_FORMS = ("paper", "scale")
RELU_FLOOR = 1e-8
R_FLOOR = 1e-12


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
    """Per-sample step multiplier ``beta > 0`` from a layer input (the module docstring has both forms' maths).

    Input ``x``: ``(N, C, H, W)`` (pooled over H, W), ``(N, C)``, or ``(N, T, C)`` (pooled over T, or one
    beta per token with ``per_token=True``). Output: ``beta`` shaped to broadcast against ``x``:
    ``(N, 1, 1, 1)``, ``(N, 1)``, ``(N, 1, 1)`` or ``(N, T, 1)``.

    ``form="scale"`` adds the buffer ``r_ref`` (set by :meth:`set_reference_scale_`) and the parameter
    ``gamma``; the paper form has neither, so its state dict is what it always was.

    Size: the hidden layer is ``channels // reduction`` wide (a single ``C -> 1`` linear when that is below 1
    or ``C < 8``), or ``hidden_size`` wide when given (a fixed width, whatever ``C``).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        positive: str = "softplus",
        per_token: bool = False,
        form: str = "paper",
        hidden_size: int | None = None,
    ):
        super().__init__()
        if positive not in POSITIVE_MAPS:
            raise ValueError(f"unknown adapter positive map {positive!r}; choose one of {POSITIVE_MAPS}")
        if form not in ADAPTER_FORMS:
            raise ValueError(f"unknown adapter form {form!r}; choose one of {ADAPTER_FORMS}")
        if channels < 1:
            raise ValueError(f"adapter needs at least one channel, got {channels}")
        if reduction < 1 or (hidden_size is not None and hidden_size < 1):
            raise ValueError(f"adapter reduction and hidden_size must be >= 1, got {reduction} and {hidden_size}")
        self.channels = channels
        self.positive = positive
        self.per_token = per_token
        self.form = form
        self.reduction = reduction
        self.hidden_size = hidden_size
        hidden = channels // reduction if hidden_size is None else hidden_size
        if hidden_size is None and (channels < 8 or hidden < 1):
            self.hidden = None
            self.out = nn.Linear(channels, 1)
        else:
            self.hidden = nn.Linear(channels, hidden)
            self.out = nn.Linear(hidden, 1)
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.constant_(self.out.bias, _bias_for_unit_beta(positive))
        if form == "scale":
            self.register_buffer("r_ref", torch.ones(()))
            self.gamma = nn.Parameter(torch.ones(()))

    def statistics(self, x: torch.Tensor) -> torch.Tensor:
        """Channel means: ``(N, C)``, or ``(N, T, C)`` per token.

        Per sample on ``(N, T, C)``, the mean is over the real tokens only when the current token mask
        (:mod:`asqpost.masking`) fits ``x``, so padding does not move a sample's ``beta``.
        """
        if x.dim() == 4:
            return x.mean(dim=(2, 3))
        if x.dim() == 3 and not self.per_token:
            return token_mean(x)
        return x

    def input_scale(self, x: torch.Tensor) -> torch.Tensor:
        """``r(x)``: mean ``|x|`` over channels and positions, one per sample (or token), floored at ``R_FLOOR``.

        Positions are the real tokens only when a token mask fits ``x`` (as in :meth:`statistics`).

        In the adapter's dtype, shaped like :meth:`statistics` with the channel dimension kept as 1: ``(N, 1)``
        or ``(N, T, 1)``.
        """
        return self._scale_of(self.statistics(x.abs()))

    def _scale_of(self, abs_means: torch.Tensor) -> torch.Tensor:
        """``r`` from the channel means of ``|x|``: their mean over channels, in the adapter's dtype, floored."""
        r = abs_means.mean(dim=-1, keepdim=True)
        return r.to(self.out.weight.dtype).clamp_min(R_FLOOR)

    def _statistics_and_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(statistics(x), input_scale(x))``, bit for bit, with one masked copy of ``x`` for both when a token
        mask applies (per sample on ``(N, T, C)``): the masked means of ``x`` and of ``|x|`` are each
        :func:`~asqpost.masking.token_mean`'s ``where(mask, ., 0).sum(T) / count``, and ``|where(mask, x, 0)|`` is
        ``where(mask, |x|, 0)`` exactly. Fewer full-size temporaries: an activation-sized buffer costs its page
        faults again whenever the allocator hands it back to the system."""
        if x.dim() == 4:
            means, abs_means = _plane_means(x)
            return means, self._scale_of(abs_means)
        if self.per_token or x.dim() != 3:
            return self.statistics(x), self.input_scale(x)
        mask = mask_for(x)
        count = token_count(x, mask, x.dtype)
        if torch.onnx.is_in_onnx_export():  # (N, 1, C) masked sums as ONNX Runtime runs them fast: fewer graph nodes
            count = count.unsqueeze(-1)
            sums, abs_sums = token_sum(x, mask, keepdim=True), token_sum(x.abs(), mask, keepdim=True)
            return sums / count, self._scale_of(abs_sums / count)
        kept = x if mask is None else torch.where(mask.unsqueeze(-1), x, x.new_zeros(()))
        means = kept.sum(dim=1) / count
        # in place where autograd needs no copy and kept is not x itself
        kept = kept.abs_() if mask is not None and not kept.requires_grad else kept.abs()
        return means, self._scale_of(kept.sum(dim=1) / count)

    @torch.no_grad()
    def set_reference_scale_(self, r_ref: float) -> None:
        """Scale form: set ``r_ref`` (calibration's mean of ``r(x)``), floored at ``R_FLOOR``."""
        if self.form != "scale":
            raise ValueError(f"only the scale-following adapter has a reference scale (this one is {self.form!r})")
        self.r_ref.fill_(max(float(r_ref), R_FLOOR))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_dim = 1 if x.dim() == 4 else -1
        if x.dim() not in (2, 3, 4) or x.shape[channel_dim] != self.channels:
            raise ValueError(
                f"StepAdapter({self.channels}) expects (N, C, H, W), (N, C) or (N, T, C) with C = "
                f"{self.channels}, got shape {tuple(x.shape)}"
            )
        out = self.out
        first = out if self.hidden is None else self.hidden
        if self.form == "scale":
            z, r = self._statistics_and_scale(x)
        else:
            z = self.statistics(x)
        if z.dtype != out.weight.dtype:  # a float64 or half input into a float32 adapter
            z = z.to(out.weight.dtype)
        # F.linear on the layers' parameters: the same maths as calling them, without the module-call overhead
        # that dominates these tiny layers at batch 1
        if self.form == "scale":
            # the first layer on m / r, computed as (W m) / r + b: the division runs on the layer's C/4 outputs
            # instead of its C inputs (per token that saves a pass over the whole activation)
            z = torch.addcdiv(first.bias, F.linear(z, first.weight), r)
        else:
            z = F.linear(z, first.weight, first.bias)
        if self.hidden is not None:
            z = F.linear(F.relu(z), out.weight, out.bias)
        beta = _positive(z, self.positive)  # (N, 1) or (N, T, 1)
        if self.form == "scale":
            beta = torch.pow(r / self.r_ref, self.gamma) * beta
        return beta if beta.dim() == x.dim() else beta.reshape(beta.shape + (1,) * (x.dim() - beta.dim()))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, positive={self.positive}, per_token={self.per_token}, form={self.form}"


class _PlaneMeans(torch.autograd.Function):
    """``(x.mean((2, 3)), x.abs().mean((2, 3)))`` of NCHW ``x`` by torch's ops; the backward in one native pass over
    ``x`` (the extension's ``plane_means_backward``: torch's mean and abs backward, the same bits)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.mean(dim=(2, 3)), x.abs().mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, g_mean, g_abs):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        g_mean = torch.zeros(x.shape[:2]) if g_mean is None else g_mean
        g_abs = torch.zeros(x.shape[:2]) if g_abs is None else g_abs
        return extension().plane_means_backward(x, g_mean.contiguous(), g_abs.contiguous())


def _plane_means(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel means of NCHW ``x`` and of ``|x|``: through :class:`_PlaneMeans` where autograd wants a graph
    through a contiguous float32 CPU ``x`` and the extension is built, else torch's ops."""
    graph = torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()
    if graph and x.dtype == torch.float32 and x.is_cpu and x.is_contiguous() and extension() is not None:
        return _PlaneMeans.apply(x)
    return x.mean(dim=(2, 3)), x.abs().mean(dim=(2, 3))
