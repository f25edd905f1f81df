"""The pure-torch backends: the reference (exact integer sums, one float64 rescale per output) and the float path
(decoded weights) for layers without an integer form.

The reference carries the sums in floating point, which is exact while every partial sum is an integer below the
format's limit: float32 when ``max|x_int| * max|w_int| * fan_in < 2^24`` (then torch's optimised float kernels,
oneDNN for convolutions, compute them exactly and fast). A linear layer with a larger fan-in (8-bit codes into 1536
inputs, say) sums runs of ``k`` short enough for that bound in float32 and adds the runs' exact results in float64;
other layers sum in float64 (``< 2^53`` for any realistic layer). This is the ground truth the other backends are
tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..levels import SQRT1_2
from ..packed import Geometry, InputSpec, LayerSpec
from .backends import Backend, integer_reason

FLOAT32_EXACT = 2**24  # every integer up to this is a float32
MIN_RUN = 64  # shorter runs of k than this: float64 sums instead


def exact_dtype(spec: LayerSpec) -> torch.dtype:
    """float32 when no partial sum can reach 2^24 (exact in float32), else float64."""
    return torch.float32 if spec.product_bound() * spec.weight.fan_in < FLOAT32_EXACT else torch.float64


def exact_run(spec: LayerSpec) -> int | None:
    """For a linear layer whose whole sums could pass 2^24: the longest run of ``k`` whose float32 sums stay
    exact (at least ``MIN_RUN``), else ``None`` (sum all of ``k`` at once in :func:`exact_dtype`)."""
    if spec.kind != "linear" or exact_dtype(spec) == torch.float32:
        return None
    run = (FLOAT32_EXACT - 1) // spec.product_bound()
    return run if run >= MIN_RUN else None


@dataclass(frozen=True, eq=False)
class ReferencePlan:
    """The integer weights as the sums read them: one tensor in :func:`exact_dtype`, or float32 column runs of
    :func:`exact_run` (``odd`` is ``None`` without odd levels); the rescale in float64 on the plan's device."""

    geometry: Geometry
    input: InputSpec
    even: list[torch.Tensor]
    odd: list[torch.Tensor] | None
    col_scale: torch.Tensor  # float64 (C_out,): scale * unit
    bias: torch.Tensor | None  # float64 (C_out,)


def reference_plan(spec: LayerSpec, device: torch.device) -> ReferencePlan:
    run = exact_run(spec)
    dtype = torch.float32 if run else exact_dtype(spec)
    even, odd = spec.weight.integer_weights()

    def runs(w: torch.Tensor) -> list[torch.Tensor]:
        w = w.to(device, dtype)
        return [w] if run is None else [part.contiguous() for part in w.split(run, dim=1)]

    col_scale, bias = spec.rescale()
    return ReferencePlan(
        spec.geometry,
        spec.input,
        runs(even),
        runs(odd) if odd.any() else None,
        col_scale.to(device),
        None if spec.bias is None else bias.to(device),
    )


def _sums(plan: ReferencePlan, x: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return plan.geometry.apply(x.to(parts[0].dtype), parts[0])
    acc, start = None, 0
    for part in parts:  # exact float32 runs, added exactly in float64
        run = plan.geometry.apply(x[..., start : start + part.shape[1]].float(), part).double()
        acc, start = run if acc is None else acc + run, start + part.shape[1]
    return acc


def integer_accumulators(plan: ReferencePlan, x_int: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(acc_even, acc_odd)``: exact integer sums of ``x_int`` against the even / odd integer weights."""
    return _sums(plan, x_int, plan.even), None if plan.odd is None else _sums(plan, x_int, plan.odd)


def combine(plan: ReferencePlan, acc: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``y = s_a * (scale * unit) * acc + bias`` in float64 (per-sample step, per-channel scale)."""
    shape = plan.geometry.channel_shape(acc)
    y = acc * plan.col_scale.reshape(shape) * step.double()
    return y if plan.bias is None else y + plan.bias.reshape(shape)


class ReferenceBackend(Backend):
    """Exact integer sums in torch, float64 rescale: every input, every device, every selection."""

    name = "reference"
    modes = frozenset({"auto", "native", "triton", "reference"})

    def eligible(self, spec: LayerSpec) -> str | None:
        return integer_reason(spec)

    def prepare(self, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> ReferencePlan:
        return reference_plan(spec, device)

    def run(self, plan: ReferencePlan, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        acc_even, acc_odd = integer_accumulators(plan, plan.input.quantize(x, step))
        acc = acc_even.double() if acc_odd is None else acc_even.double() + acc_odd.double() * SQRT1_2
        return combine(plan, acc, step).to(x.dtype)


@dataclass(frozen=True, eq=False)
class FloatPlan:
    geometry: Geometry
    input: InputSpec | None
    weight: torch.Tensor  # the decoded (or float) weight in the input's dtype, on its device
    bias: torch.Tensor | None


class FloatBackend(Backend):
    """Fake-quantized input times the decoded weight (a layer with no integer form, or whose input stays float)."""

    name = "float"
    modes = frozenset({"auto", "native", "triton", "reference"})

    def eligible(self, spec: LayerSpec) -> str | None:
        return None

    def prepare(self, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> FloatPlan:
        weight = spec.float_weight.to(device, dtype) if spec.weight is None else spec.weight.dequantize(dtype, device)
        bias = None if spec.bias is None else spec.bias.to(device, dtype)
        return FloatPlan(spec.geometry, spec.input, weight, bias)

    def run(self, plan: FloatPlan, x: torch.Tensor, step: torch.Tensor | None) -> torch.Tensor:
        if plan.input is not None:
            x = plan.input.quantize(x, step) * step
        return plan.geometry.apply(x, plan.weight, plan.bias)

    def describe(self, plan: FloatPlan, spec: LayerSpec) -> tuple[str, str]:
        return self.name, integer_reason(spec) or ""
