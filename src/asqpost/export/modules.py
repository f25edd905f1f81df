"""Packed layers: weights as b-bit codes + a level table + per-channel scales; inference from that form.

A packed layer computes, for integer activation codes ``x_int = clamp(round(x / s_a), qmin, qmax)`` with the
per-sample step ``s_a = s * beta(x)`` (``beta = 1`` for LSQ):

    y[n] = s_a * scale[n] * unit * (acc_even[n] + acc_odd[n] / sqrt 2) + bias[n]
    acc_even = x_int . even[codes[n, :]],  acc_odd = x_int . odd[codes[n, :]]

where ``(even, odd, unit)`` is the table's :class:`~asqpost.packed.IntegerLUT` (POST splits even and odd
powers of sqrt 2; other grids have ``odd = 0``). The two sums are exact integers. A packed layer hands its data
to the kernels as a :class:`~asqpost.packed.LayerSpec` and keeps their plans in one
:class:`~asqpost.kernels.PlanCache`, cleared whenever its tensors change; the registry of
:mod:`asqpost.kernels` picks the backend. A layer whose table has no small-integer form, or whose input stays
float, runs the same maths with decoded float weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import StepAdapter
from ..kernels import PlanCache, rotate
from ..masking import FORWARD_SCOPED, install_mask_hooks
from ..nn import QuantConv2d, QuantLinear, check_conv_input, check_linear_input
from ..packed import (
    ConvGeometry,
    InputSpec,
    IntegerLUT,
    LayerSpec,
    LinearGeometry,
    WeightSpec,
    integer_lut,
    needs_single_sum,
    pack_codes,
    packed_nbytes,
    single_sum_table,
    unpack_codes,
)
from ..quantizers import Quantizer
from ..rotation import check_rotation_block

log = logging.getLogger(__name__)


class PackedWeight(nn.Module):
    """A weight ``(C_out, ...)`` stored as packed codes: ``w = table[codes] * scale[c]``.

    Buffers: ``codes`` uint8 ``(ceil(numel * bits / 8),)``; ``table`` float64 ``(L,)`` with ``L <= 2**bits``;
    ``scale`` float32 ``(C_out,)``.
    """

    def __init__(self, shape: tuple[int, ...], bits: int, table_size: int):
        super().__init__()
        if table_size > 2**bits:
            raise ValueError(f"a {table_size}-entry table does not fit {bits}-bit codes")
        self.shape = tuple(shape)
        self.bits = bits
        numel = math.prod(shape)
        self.register_buffer("codes", torch.zeros(packed_nbytes(numel, bits), dtype=torch.uint8))
        self.register_buffer("table", torch.zeros(table_size, dtype=torch.float64))
        self.register_buffer("scale", torch.ones(shape[0]))

    @classmethod
    def from_quantizer(cls, weight: torch.Tensor, quantizer: Quantizer, single_sum: bool = False) -> PackedWeight:
        """The packed form of ``quantizer(weight)``; ``single_sum`` rounds a table with odd levels (POST) onto
        the int8 grid of :func:`~asqpost.packed.single_sum_table` (approximate; other tables are unchanged)."""
        with torch.no_grad():
            export = quantizer.export_weight(weight)
            table, scale = export.table, export.scale.reshape(-1)
            if single_sum and needs_single_sum(table):
                table, factor = single_sum_table(table)
                scale = scale.double() * factor
            packed = cls(tuple(weight.shape), quantizer.bits, table.numel())
            packed.codes.copy_(pack_codes(export.codes, quantizer.bits))
            packed.table.copy_(table)
            packed.scale.copy_(scale.float())
        return packed

    def code_tensor(self) -> torch.Tensor:
        """Unpacked codes, int64, shaped like the weight, on the CPU (decoded on each call: kernels keep their own
        form in their plans)."""
        return unpack_codes(self.codes.cpu(), self.bits, math.prod(self.shape)).reshape(self.shape)

    def lut(self) -> IntegerLUT | None:
        """The table's small-integer form (computed on each call), or ``None``."""
        return integer_lut(self.table.cpu())

    def spec(self) -> WeightSpec:
        """This weight as the kernels read it (codes decoded on the CPU)."""
        return WeightSpec(self.code_tensor(), self.table, self.lut(), self.scale, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``table[codes] * scale`` (what fake quantization produced), on the table's device."""
        return self.spec().dequantize(dtype, self.table.device)


def _adapter_meta(adapter: StepAdapter | None) -> dict | None:
    """The constructor arguments that rebuild ``adapter`` (its weights travel as tensors)."""
    if adapter is None:
        return None
    return {
        "channels": adapter.channels,
        "positive": adapter.positive,
        "per_token": adapter.per_token,
        "form": adapter.form,  # absent in exports made before the scale form: StepAdapter's default, "paper"
        "reduction": adapter.reduction,  # these two absent before the size was a choice: the defaults
        "hidden_size": adapter.hidden_size,
    }


class PackedInput(nn.Module):
    """Activation quantization of a packed layer: ``x_int`` and the per-sample step ``s_a`` (LSQ or ASQ).

    Layers that shared one input quantizer in training (Q, K and V) hold equal copies of it; :func:`link_inputs`
    lets the copies reuse their lead's ASQ step for the same input tensor, so the adapter runs once for all.
    """

    def __init__(self, qmin: int, qmax: int, adapter: dict | None = None):
        super().__init__()
        self.qmin, self.qmax = int(qmin), int(qmax)
        self.register_buffer("step", torch.ones(()))
        self.adapter = None if adapter is None else StepAdapter(**adapter)
        self._lead: list[PackedInput] = []  # the linked lead (a list: not a submodule, not in the state dict)
        self._followers = 0  # linked layers that take this one's step
        self._last: tuple[weakref.ref, int | None, torch.Tensor] | None = None  # (input, its version, its step)
        self._last_fold: tuple[weakref.ref, int | None, torch.Tensor] | None = None  # (input, version, folded)

    @classmethod
    def from_quantizer(cls, quantizer: Quantizer) -> PackedInput:
        export = quantizer.export_act()
        packed = cls(export.qmin, export.qmax, _adapter_meta(export.adapter)).to(export.step.device)
        with torch.no_grad():
            packed.step.copy_(export.step)
            if export.adapter is not None:
                packed.adapter.load_state_dict(export.adapter.state_dict())
        return packed

    def meta(self) -> dict:
        return {"qmin": self.qmin, "qmax": self.qmax, "adapter": _adapter_meta(self.adapter)}

    def step_of(self, x: torch.Tensor) -> torch.Tensor:
        """``s_a = s * beta(x)``: broadcasts against ``x`` (a scalar, or one per sample/token with ASQ)."""
        if self.adapter is None:
            return self.step
        if torch.compiler.is_compiling():  # a traced graph computes the step once per tensor by itself
            return self.step * self.adapter(x)
        if self._lead:
            return self._lead[0].step_of(x)
        if not self._followers:
            return self.step * self.adapter(x)
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        last = self._last
        if last is not None and last[0]() is x and last[1] == version:
            return last[2]
        step = self.step * self.adapter(x)
        self._last = (weakref.ref(x), version, step)
        return step

    def folded_of(self, x: torch.Tensor, fold: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fold(x)`` (the layer's smoothing and rotation), computed once per input tensor for a linked group:
        the followers get the lead's tensor, so :meth:`step_of` finds the lead's step for it as well."""
        if (not self._lead and not self._followers) or torch.compiler.is_compiling():
            return fold(x)
        holder = self._lead[0] if self._lead else self
        version = None if x.is_inference() else x._version
        last = holder._last_fold
        if last is not None and last[0]() is x and last[1] == version:
            return last[2]
        folded = fold(x)
        holder._last_fold = (weakref.ref(x), version, folded)
        return folded

    def forget(self) -> None:
        """Drop the remembered step and folded input (the mask hooks' post-hook does so when a forward of a
        linked model ends: an inference tensor has no version counter to tell that it was overwritten in place)."""
        self._last = self._last_fold = None

    def link_to(self, lead: PackedInput | None) -> None:
        """Take ``lead``'s step for the input it has just seen (``lead`` holds an equal quantizer), or unlink."""
        if self._lead:
            self._lead[0]._followers -= 1
        self._lead = [] if lead is None else [lead]
        if lead is not None:
            lead._followers += 1
        self._last = self._last_fold = None

    @property
    def lead(self) -> PackedInput | None:
        return self._lead[0] if self._lead else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_int as float, s_a)``."""
        step = self.step_of(x)
        return torch.clamp(torch.round(x / step), self.qmin, self.qmax), step

    def extra_repr(self) -> str:
        return f"qmin={self.qmin}, qmax={self.qmax}, asq={self.adapter is not None}"


def link_inputs(model: nn.Module, groups: list[list[str]]) -> None:
    """Link the input quantization of each group of packed layers (names in ``model``) to the group's first:
    layers that read one tensor (Q, K, V) then compute its ASQ step once. Raises ``ValueError`` for names that
    are not packed layers with a quantized input, or for groups whose quantizers are not equal."""
    for group in groups:
        inputs = [_packed_input(model, name) for name in group]
        lead, lead_layer = inputs[0], model.get_submodule(group[0])
        for name, other in zip(group[1:], inputs[1:], strict=True):
            if other.meta() != lead.meta() or not _same_state(other, lead):
                raise ValueError(f"layer {name!r} does not hold the same input quantizer as {group[0]!r}")
            if not _same_fold(model.get_submodule(name), lead_layer):
                raise ValueError(f"layer {name!r} does not smooth or rotate its input as {group[0]!r} does")
            other.link_to(lead)
    # the mask hooks' post-hook makes the leads forget their step when a forward of the model ends
    setattr(model, FORWARD_SCOPED, [m for m in model.modules() if isinstance(m, PackedInput) and m._followers])
    install_mask_hooks(model)


def input_links(model: nn.Module) -> list[list[str]]:
    """The groups :func:`link_inputs` made, as names (lead first), for the export file."""
    names = {
        id(m.input_quant): name
        for name, m in model.named_modules()
        if isinstance(m, PackedLayer) and m.input_quant is not None
    }
    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, PackedLayer) and module.input_quant is not None and module.input_quant.lead is not None:
            lead = names[id(module.input_quant.lead)]
            groups.setdefault(lead, [lead]).append(name)
    return list(groups.values())


def _packed_input(model: nn.Module, name: str) -> PackedInput:
    layer = model.get_submodule(name)
    if not isinstance(layer, PackedLayer) or layer.input_quant is None:
        raise ValueError(f"{name!r} is not a packed layer with a quantized input")
    return layer.input_quant


def _same_fold(a: PackedLayer, b: PackedLayer) -> bool:
    smooth_equal = (a.smooth is None) == (b.smooth is None) and (a.smooth is None or torch.equal(a.smooth, b.smooth))
    return smooth_equal and a.rotate == b.rotate


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class PackedLayer(nn.Module):
    """Base of :class:`PackedLinear` and :class:`PackedConv2d`; built from :meth:`meta` alone, filled by loading.

    ``weight`` is a :class:`PackedWeight` (or ``None`` with ``float_weight`` kept for float-weight layers);
    ``input_quant`` a :class:`PackedInput` (or ``None`` when the layer's input stays float); ``geometry`` a
    :class:`~asqpost.packed.LinearGeometry` or :class:`~asqpost.packed.ConvGeometry`; ``plans`` the kernels'
    :class:`~asqpost.kernels.PlanCache`.
    """

    kind = ""
    geometry_type: type[LinearGeometry] | type[ConvGeometry]

    def __init__(self, meta: dict):
        super().__init__()
        self.geometry = self.geometry_type(**meta["geometry"])
        weight_shape = tuple(meta["weight_shape"])
        w = meta["weight"]
        self.weight = None if w is None else PackedWeight(weight_shape, w["bits"], w["table_size"])
        self.float_weight = None if w is not None else nn.Parameter(torch.zeros(weight_shape), requires_grad=False)
        a = meta["input"]
        self.input_quant = None if a is None else PackedInput(a["qmin"], a["qmax"], a["adapter"])
        self.bias = nn.Parameter(torch.zeros(weight_shape[0]), requires_grad=False) if meta["bias"] else None
        in_channels = self.geometry.input_channels
        self.register_buffer("smooth", torch.ones(in_channels) if meta.get("smooth") else None)
        self.rotate = meta.get("rotate")  # exports before rotation have no field
        if self.rotate is not None and (self.kind != "linear" or in_channels % check_rotation_block(self.rotate)):
            raise ValueError(f"bad rotation block {self.rotate!r} for a {self.kind} layer of {in_channels} inputs")
        self.plans = PlanCache(self.spec)

    @classmethod
    def from_quant(cls, layer: QuantConv2d | QuantLinear, single_sum: bool = False) -> PackedLayer:
        """The packed form of a calibrated quantized layer (``single_sum``: see :meth:`PackedWeight.from_quantizer`)."""
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        weight = None if wq is None else PackedWeight.from_quantizer(layer.folded_weight().detach(), wq, single_sum)
        packed_input = None if aq is None else PackedInput.from_quantizer(aq)
        meta = {
            "kind": cls.kind,
            "geometry": cls.geometry_of(layer),
            "weight_shape": list(layer.weight.shape),
            "weight": None if weight is None else {"bits": weight.bits, "table_size": weight.table.numel()},
            "input": None if packed_input is None else packed_input.meta(),
            "bias": layer.bias is not None,
            "smooth": layer.smooth_scale is not None,
            "rotate": layer.rotate_block,
        }
        packed = cls(meta).to(layer.weight.device)
        with torch.no_grad():
            if layer.smooth_scale is not None:
                packed.smooth.copy_(layer.smooth_scale)
            if weight is not None:
                packed.weight.load_state_dict(weight.state_dict())
            else:
                packed.float_weight.copy_(layer.folded_weight())
            if packed_input is not None:
                packed.input_quant.load_state_dict(packed_input.state_dict())
            if layer.bias is not None:
                packed.bias.copy_(layer.bias)
        return packed

    @staticmethod
    def geometry_of(layer: nn.Module) -> dict:
        raise NotImplementedError

    def meta(self) -> dict:
        geometry = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.geometry).items()}
        return {
            "kind": self.kind,
            "geometry": geometry,
            "weight_shape": list(self.weight.shape if self.weight is not None else self.float_weight.shape),
            "weight": None
            if self.weight is None
            else {"bits": self.weight.bits, "table_size": self.weight.table.numel()},
            "input": None if self.input_quant is None else self.input_quant.meta(),
            "bias": self.bias is not None,
            "smooth": self.smooth is not None,
            "rotate": self.rotate,
        }

    def spec(self) -> LayerSpec:
        """The layer as the kernels read it (:class:`~asqpost.packed.LayerSpec`)."""
        inp = self.input_quant
        return LayerSpec(
            geometry=self.geometry,
            weight=None if self.weight is None else self.weight.spec(),
            float_weight=None if self.float_weight is None else self.float_weight.detach(),
            input=None if inp is None else InputSpec(inp.qmin, inp.qmax, inp.adapter is not None),
            bias=None if self.bias is None else self.bias.detach(),
            smooth=self.smooth,
            rotate=self.rotate,
        )

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .double(): plans follow the tensors
        self.plans.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # plans follow the loaded codes
        self.plans.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def check_input(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        """The layer's output; ``kernel`` overrides the kernel selection (:func:`asqpost.kernels.use_kernel`)."""
        self.check_input(x)
        x = self.folded(x)
        step = None if self.input_quant is None else self.input_quant.step_of(x)
        return self.plans.run(x, step, kernel)

    def folded(self, x: torch.Tensor) -> torch.Tensor:
        """SmoothQuant's ``x / s`` per input channel, then the Hadamard rotation (the weight was packed as
        ``(W * s) R``), or ``x``. Every kernel then sees the folded input; linked layers (Q, K, V) fold their
        common input once (:meth:`PackedInput.folded_of`)."""
        if self.smooth is None and self.rotate is None:
            return x
        if self.input_quant is None:
            return self._fold(x)
        return self.input_quant.folded_of(x, self._fold)

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            shape = (1, -1, 1, 1) if self.kind == "conv2d" else (-1,)
            x = x / self.smooth.reshape(shape).to(x.dtype)
        return x if self.rotate is None else rotate(x, self.rotate)

    def extra_repr(self) -> str:
        bits = None if self.weight is None else self.weight.bits
        return f"{self.geometry}, weight_bits={bits}"


class PackedLinear(PackedLayer):
    """Packed ``nn.Linear``: inputs ``(N, C)`` or ``(N, T, C)``."""

    kind = "linear"
    geometry_type = LinearGeometry

    @staticmethod
    def geometry_of(layer: nn.Module) -> dict:
        return {"in_features": layer.in_features, "out_features": layer.out_features}

    def check_input(self, x):
        check_linear_input(x, self.geometry.in_features, "PackedLinear")


class PackedConv2d(PackedLayer):
    """Packed ``nn.Conv2d`` (stride, padding, dilation, groups; zero padding only)."""

    kind = "conv2d"
    geometry_type = ConvGeometry

    @staticmethod
    def geometry_of(layer: nn.Module) -> dict:
        if layer.padding_mode != "zeros":
            raise ValueError(f"packed conv supports zero padding only, got padding_mode={layer.padding_mode!r}")
        if isinstance(layer.padding, str):
            raise ValueError(f"packed conv needs numeric padding, got {layer.padding!r}")
        return {
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": list(layer.kernel_size),
            "stride": list(layer.stride),
            "padding": list(layer.padding),
            "dilation": list(layer.dilation),
            "groups": layer.groups,
        }

    def check_input(self, x):
        check_conv_input(x, self.geometry.in_channels, "PackedConv2d")


PACKED_LAYERS: dict[str, type[PackedLayer]] = {"linear": PackedLinear, "conv2d": PackedConv2d}
QUANT_TO_PACKED: dict[type[nn.Module], type[PackedLayer]] = {QuantLinear: PackedLinear, QuantConv2d: PackedConv2d}


@dataclass(frozen=True)
class LayerKernel:
    """One packed layer's entry in :func:`kernel_report`: its module name, kind (``linear`` / ``conv2d``), the
    backend its float32 inputs on the layer's device take (``triton``, ``native avx512_vnni``, ``native avx2``,
    ``native scalar``, ``torch sums``, ``reference`` or ``float``) and why."""

    name: str
    kind: str
    path: str
    reason: str


def kernel_report(model: nn.Module, kernel: str | None = None) -> list[LayerKernel]:
    """Each packed layer of ``model`` with the backend it takes and why, in module order, from the kernel registry
    under the selection ``kernel`` (default: the one in force). Builds the plans the first forward would build."""
    return [
        LayerKernel(name, module.kind, *module.plans.describe(_device_of(module), kernel))
        for name, module in model.named_modules()
        if isinstance(module, PackedLayer)
    ]


def _device_of(layer: PackedLayer) -> torch.device:
    return (layer.float_weight if layer.weight is None else layer.weight.codes).device


def kernel_summary(report: list[LayerKernel]) -> str:
    """One line: how many layers take which path, and why (most common first)."""
    counts = Counter((entry.path, entry.reason) for entry in report)
    parts = [f"{count} {path} ({reason})" for (path, reason), count in counts.most_common()]
    return f"{len(report)} packed layers: " + "; ".join(parts)


def format_kernel_report(report: list[LayerKernel]) -> str:
    """The report as an aligned text table (name, kind, path, reason), one layer per line."""
    rows = [("layer", "kind", "path", "reason")] + [(e.name, e.kind, e.path, e.reason) for e in report]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join([*(row[i].ljust(widths[i]) for i in range(3)), row[3]]) for row in rows]
    return "\n".join(lines)


def log_kernel_plan(model: nn.Module, what: str = "packed model") -> None:
    """Log :func:`kernel_summary` of ``model`` as one INFO line (called when a packed model is made or loaded).
    Nothing is computed unless INFO is logged (the plans are otherwise built by the first forward)."""
    if not log.isEnabledFor(logging.INFO):
        return
    report = kernel_report(model)
    if report:
        log.info("%s: %s", what, kernel_summary(report))
