"""The quantizer interface.

A :class:`Quantizer` is an ``nn.Module`` whose ``forward(x)`` returns the fake-quantized ``x_hat``:

    x_hat = Q(clamp(x / scale, lo, hi)) * scale

with a learned, positive ``scale`` (LSQ's step, or a level set's per-channel scale) and a rounding ``Q`` to
the grid. It is built complete by its constructor (parameters have their final shapes) and initialised from
data by an explicit :meth:`Quantizer.calibrate_` (or :func:`asqpost.calibrate` for a whole model). A forward
before calibration raises. ``forward`` never writes to parameters.

In eval mode a weight quantizer projects its weight once and reuses the result (:class:`ProjectionCache`)
until the weight or the scale changes (in place, by loading, by ``.to()``, or replaced), or train mode returns;
only where no autograd graph is wanted (``torch.no_grad``, ``torch.inference_mode``, or nothing requires grad),
so gradients are never affected.

A new method is one module: a subclass that declares ``roles``, ``inits`` and ``label``, implements
:meth:`Quantizer.grid`, :meth:`Quantizer.quantize` and the export of its roles (:meth:`Quantizer.export_weight`
/ :meth:`Quantizer.export_act`), decorated with :func:`asqpost.registry.register_quantizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapters import StepAdapter
from ..config import QuantizerConfig
from ..functional import Rounder
from ..masking import valid_tokens
from ..registry import get_method
from .init import mse_scale, percentile_scale, subsample

SCALE_FLOOR = 1e-8
LOW_PRECISION = (torch.float16, torch.bfloat16)
"""Input dtypes that :meth:`Quantizer.forward` quantizes in float32 (as it does everything under autocast)."""


class NotCalibratedError(RuntimeError):
    """A quantizer ran before it was initialised from data."""


def check_finite(x: torch.Tensor, what: str) -> None:
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}); calibration needs data")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or inf; refusing to calibrate from it")


def positive(raw: torch.Tensor) -> torch.Tensor:
    """``|raw|`` floored at ``SCALE_FLOOR``: positive by construction; exactly ``raw`` when raw >= floor."""
    return raw.abs().clamp_min(SCALE_FLOOR)


def _tensor_state(t: torch.Tensor) -> tuple:
    """What identifies a tensor's values while its storage is alive: address, version counter, layout, dtype."""
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), tuple(t.stride()), t.storage_offset())


class ProjectionCache:
    """One eval-mode weight projection and the state of every tensor it was computed from (the weight, the
    quantizer's parameters and buffers). It holds aliases of those tensors, so their storage cannot be freed and
    reused at the same address while the entry lives: a matching address and version counter mean the same
    values. Replaced tensors, ``.to()``, in-place edits (optimizer steps, ``copy_`` in ``load_state_dict``) all
    change the state and miss."""

    def __init__(self) -> None:
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._state: tuple = ()
        self._output: torch.Tensor | None = None

    @staticmethod
    def _key(tensors: tuple[torch.Tensor, ...]) -> tuple:
        return (torch.is_inference_mode_enabled(), *(_tensor_state(t) for t in tensors))

    def get(self, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        if self._output is None or len(tensors) != len(self._inputs):
            return None
        return self._output if self._key(tensors) == self._state else None

    def put(self, tensors: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._inputs = tuple(t.detach() for t in tensors)
        self._state = self._key(tensors)
        self._output = output

    def clear(self) -> None:
        self._inputs, self._state, self._output = (), (), None


@dataclass(frozen=True)
class WeightExport:
    """A quantized weight as a packed export stores it: ``w_hat = table[codes] * scale`` (per output channel).

    codes: int64 shaped like the weight, in ``[0, len(table))``; table: float64 ``(L,)``, ``L <= 2**bits``;
    scale: ``(C_out,)``.
    """

    codes: torch.Tensor
    table: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True)
class ActExport:
    """A quantized activation as a packed export computes it: ``x_int = clamp(round(x / s_a), qmin, qmax)``.

    ``s_a = step * adapter(x)`` (one factor per sample or token), or ``step`` when ``adapter`` is ``None``.
    """

    qmin: int
    qmax: int
    step: torch.Tensor
    adapter: StepAdapter | None = None


class Quantizer(nn.Module):
    """Base class: fake quantization of a weight (``role='weight'``) or an activation (``role='act'``).

    Weights get one scale per output channel (dim 0): ``raw_scale`` is ``(C_out, 1, ...)``; activations one
    scale per tensor: ``raw_scale`` is ``()``. Subclasses define the grid (:meth:`grid`), :meth:`quantize`,
    and the export of the roles they declare.

    Class attributes: ``roles`` (``"weight"`` and/or ``"act"``), ``inits`` (the scale initialisations
    implemented: ``mse`` and ``percentile`` here; ``lsq`` needs an integer grid), ``label`` (reports).
    """

    roles: ClassVar[tuple[str, ...]] = ()
    inits: ClassVar[tuple[str, ...]] = ("mse", "percentile")
    label: ClassVar[str] = ""

    def __init__(self, config: QuantizerConfig, role: str, weight_shape: torch.Size | None = None):
        super().__init__()
        if role not in self.roles:
            raise ValueError(f"{type(self).__name__} cannot quantize role {role!r}")
        self.config = config
        self.role = role
        self.bits = config.bits
        self.init = config.init_for(role)
        if role == "weight":
            if weight_shape is None:
                raise ValueError("a weight quantizer needs weight_shape")
            shape: tuple[int, ...] = (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
        else:
            shape = ()
        self.raw_scale = nn.Parameter(torch.ones(shape))
        self.calibrated = False
        self.observing = False
        self._projection = ProjectionCache()
        self._reset_observations()

    @property
    def scale(self) -> torch.Tensor:
        return positive(self.raw_scale)

    def grid(self) -> tuple[Rounder, float, float]:
        """``(rounder, lo, hi)`` of the normalised grid that ``x / scale`` is rounded to."""
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe_(x)
            return x
        if not self.calibrated:
            raise NotCalibratedError(
                f"{type(self).__name__} ({self.role}, {self.bits} bits) is not calibrated: call "
                "asqpost.calibrate(model, batches) (or quantizer.calibrate_(x)) before the first forward"
            )
        if x.dtype in LOW_PRECISION or torch.is_autocast_enabled(x.device.type):
            return self._forward_fp32(x)
        if self.role != "weight" or self.training:
            return self.quantize(x)
        return self._cached_quantize(x)

    def _forward_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed precision: the division, rounding, clamp and rescale (and ASQ's adapter) run in float32 with
        autocast off, so a code never depends on half-precision rounding of ``x / s``; the result comes back in
        ``x``'s dtype (the next matmul casts it as autocast says)."""
        with torch.autocast(x.device.type, enabled=False):
            x32 = x.float()
            out = self.quantize(x32) if self.role != "weight" or self.training else self._cached_quantize(x32)
        return out.to(x.dtype)

    def _cached_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Eval-mode weight projection, computed once per state of ``w`` and the quantizer's tensors (see
        :class:`ProjectionCache`); computed afresh whenever autograd may want a graph through it."""
        tensors = (w, *self.parameters(), *self.buffers())
        graph = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if graph or any(t.is_inference() for t in tensors):  # a graph is wanted, or no version counters to key on
            return self.quantize(w)
        cached = self._projection.get(tensors)
        if cached is None:
            cached = self.quantize(w)
            self._projection.put(tensors, cached)
        return cached

    def train(self, mode: bool = True) -> Quantizer:
        self._projection.clear()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .double(): the held projection is for the old tensors
        self._projection.clear()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles do not carry the projection
        state = self.__dict__.copy()
        state["_projection"] = ProjectionCache()
        return state

    def _reset_observations(self) -> None:
        self._samples: list[torch.Tensor] = []
        self._abs_sum = 0.0
        self._count = 0
        self._min = float("inf")

    @torch.no_grad()
    def observe_(self, x: torch.Tensor) -> None:
        """Accumulate calibration statistics (weights: the tensor itself; activations: a subsample).

        Activations ``(N, T, C)`` under a fitting token mask (:mod:`asqpost.masking`) count real tokens only.
        """
        if self.role == "weight":
            check_finite(x, "weight calibration input")
            self._samples = [x.detach().float().reshape(x.shape[0], -1)]
            return
        x = valid_tokens(x)
        check_finite(x, "act calibration input")
        self._samples.append(subsample(x))
        self._abs_sum += float(x.detach().abs().sum())
        self._count += x.numel()
        self._min = min(self._min, float(x.min()))

    def _decide_range(self, observed_min: float) -> None:
        """Hook: fix anything the data decides (e.g. signedness) before the scale is searched."""

    @torch.no_grad()
    def finalize_(self) -> None:
        """Initialise the scale from the observed statistics (``self.init``) and mark calibrated."""
        if not self._samples:
            raise ValueError(f"{type(self).__name__} saw no calibration data")
        self._decide_range(self._min)
        rows = self._samples[0] if self.role == "weight" else torch.cat(self._samples)[None, :]
        rounder, lo, hi = self.grid()
        if self.init == "mse":
            scale = mse_scale(rows, rounder, lo, hi)
        elif self.init == "percentile":
            scale = percentile_scale(rows, hi)
        else:  # LSQ: s = 2 mean|x| / sqrt(qmax), over all observed elements
            mean_abs = rows.abs().mean(dim=1) if self.role == "weight" else torch.tensor([self._abs_sum / self._count])
            scale = 2 * mean_abs / hi**0.5
        self.raw_scale.copy_(scale.clamp_min(1e-6).reshape(self.raw_scale.shape).to(self.raw_scale))
        self._reset_observations()
        self._projection.clear()
        self.calibrated = True

    @torch.no_grad()
    def calibrate_(self, x: torch.Tensor) -> Quantizer:
        """Initialise in place from one tensor (observe + finalize)."""
        self.observe_(x)
        self.finalize_()
        return self

    def export_weight(self, w: torch.Tensor) -> WeightExport:
        """Weight quantizers: ``w`` as codes into a level table times per-channel scales (what packing stores).

        ``table[codes] * scale`` equals ``self(w)``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not export weights")

    def export_act(self) -> ActExport:
        """Activation quantizers: the integer range, step and step adapter a packed layer applies."""
        raise NotImplementedError(f"{type(self).__name__} does not export activations")

    def get_extra_state(self) -> dict[str, Any]:
        return {"calibrated": self.calibrated}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._projection.clear()
        self.calibrated = bool(state["calibrated"])

    def extra_repr(self) -> str:
        return f"method={self.config.method}, bits={self.bits}, role={self.role}"


def build_quantizer(
    config: QuantizerConfig, role: str, *, channels: int | None = None, weight_shape: torch.Size | None = None
) -> Quantizer:
    """Build the quantizer that ``config.method`` names.

    Weights need ``weight_shape`` (one scale per output channel, dim 0); activations need ``channels`` (the
    layer's input channels, for ASQ's adapter).
    """
    config.check_role(role)
    cls = get_method(config.method).cls
    if role == "weight":
        if weight_shape is None:
            raise ValueError("a weight quantizer needs weight_shape")
        return cls(config, role, weight_shape=torch.Size(weight_shape))
    if channels is None:
        raise ValueError("an activation quantizer needs channels")
    return cls(config, role, channels=channels)
