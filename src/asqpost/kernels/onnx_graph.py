"""The ``onnx`` backend: a packed layer in ONNX's standard operators, the form :func:`asqpost.export.to_onnx` traces.

In torch it computes what the reference computes (exact integer sums, then the rescale in float32); traced by
``torch.onnx.export`` it becomes, per layer with an integer form::

    x_u8 = QuantizeLinear(x, s_a, offset) [-> Clip]                     # offset = -qmin for a signed range
    w_i8 = Gather(table_i8, Cast<int64>(codes))                         # codes: b-bit, table: the integer levels
    acc  = MatMulInteger(x_u8, w_i8, offset)   or   ConvInteger(...)    # exact int32 sums
    y    = Cast<float>(acc) * (scale * unit) * s_a + bias

with a second ``MatMulInteger`` on the odd table for POST's exact grid (``acc_even + acc_odd / sqrt 2``). The codes
stay codes in the file (ONNX Runtime folds the ``Gather`` into an int8 weight when it loads the model). A layer
whose levels are no int8 integers, or whose input is not quantized to at most 8 bits, runs the decoded weight
(``Gather(levels, codes) * scale``) in a float ``MatMul`` / ``Conv`` after fake quantization of its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..levels import SQRT1_2
from ..packed import ConvGeometry, Geometry, InputSpec, LayerSpec
from .backends import Backend

# ONNX TensorProto element types
ONNX_FLOAT, ONNX_UINT8, ONNX_INT64 = 1, 2, 7
INT8_MIN, INT8_MAX = -128, 127
UINT8_MAX = 255


def integer_form(spec: LayerSpec) -> bool:
    """Whether ONNX's integer ops compute ``spec`` exactly: uint8 activation codes (after the offset) and int8
    integer levels."""
    lut = spec.lut
    if lut is None or spec.input.qmax + spec.input.offset > UINT8_MAX:
        return False
    levels = torch.cat([lut.even, lut.odd])
    return int(levels.min()) >= INT8_MIN and int(levels.max()) <= INT8_MAX


@dataclass(frozen=True, eq=False)
class OnnxPlan:
    """Codes ``uint8`` laid out for the op (linear ``(K, C_out)``, conv weight-shaped) and their tables; for the
    integer form ``even`` / ``odd`` int8 and ``scale`` the float32 ``scale * unit``, else ``levels`` float32 and
    ``scale`` the per-channel scale; ``float_weight`` for a layer whose weight stays float."""

    geometry: Geometry
    input: InputSpec | None
    codes: torch.Tensor | None
    even: torch.Tensor | None
    odd: torch.Tensor | None
    levels: torch.Tensor | None
    scale: torch.Tensor | None
    float_weight: torch.Tensor | None
    bias: torch.Tensor | None


def onnx_plan(spec: LayerSpec) -> OnnxPlan:
    bias = None if spec.bias is None else spec.bias.detach().cpu().float()
    if spec.weight is None:
        return OnnxPlan(spec.geometry, spec.input, None, None, None, None, None, spec.float_weight.cpu().float(), bias)
    codes = spec.weight.codes.to(torch.uint8)
    codes = codes.t().contiguous() if spec.kind == "linear" else codes
    if integer_form(spec):
        lut = spec.lut
        odd = lut.odd.to(torch.int8) if lut.has_odd else None
        col_scale, _ = spec.rescale()
        even = lut.even.to(torch.int8)
        return OnnxPlan(spec.geometry, spec.input, codes, even, odd, None, col_scale.float(), None, bias)
    levels, scale = spec.weight.table.cpu().float(), spec.weight.scale.detach().cpu().float()
    return OnnxPlan(spec.geometry, spec.input, codes, None, None, levels, scale, None, bias)


def _constant(g: Any, value: torch.Tensor) -> Any:
    return g.op("Constant", value_t=value)


def _gather(g: Any, table: torch.Tensor, index: Any) -> Any:
    """``table[index]``: the codes stay codes in the graph (``index`` is ``Cast<int64>(codes)``)."""
    return g.op("Gather", _constant(g, table), index, axis_i=0)


def _conv_attributes(geometry: ConvGeometry) -> dict[str, Any]:
    pad_h, pad_w = geometry.padding
    return {
        "kernel_shape_i": list(geometry.kernel_size),
        "strides_i": list(geometry.stride),
        "pads_i": [pad_h, pad_w, pad_h, pad_w],
        "dilations_i": list(geometry.dilation),
        "group_i": geometry.groups,
    }


class _IntegerSum(torch.autograd.Function):
    """``(x_u8 - offset) . even[codes]`` (``+ (x_u8 - offset) . odd[codes] / sqrt 2`` for POST's exact grid) from
    exact int32 sums, in float32; ONNX: ``MatMulInteger`` / ``ConvInteger`` per table on one ``Gather`` index."""

    @staticmethod
    def forward(ctx, x_u8: torch.Tensor, plan: OnnxPlan) -> torch.Tensor:  # type: ignore[override]
        x = x_u8.double() - plan.input.offset
        codes = plan.codes.long()
        acc = _exact_product(x, plan.even.double()[codes], plan.geometry).float()
        if plan.odd is None:
            return acc
        return acc + _exact_product(x, plan.odd.double()[codes], plan.geometry).float() * SQRT1_2

    @staticmethod
    def symbolic(g: Any, x_u8: Any, plan: OnnxPlan) -> Any:
        index = g.op("Cast", _constant(g, plan.codes), to_i=ONNX_INT64)
        zero_point = _constant(g, torch.tensor(plan.input.offset, dtype=torch.uint8))
        acc = _integer_op(g, x_u8, _gather(g, plan.even, index), zero_point, plan.geometry)
        if plan.odd is None:
            return acc
        odd = _integer_op(g, x_u8, _gather(g, plan.odd, index), zero_point, plan.geometry)
        return g.op("Add", acc, g.op("Mul", odd, _constant(g, torch.tensor(SQRT1_2, dtype=torch.float32))))


def _exact_product(x: torch.Tensor, weight: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """Integer-valued float64 operands: the sums are exact below 2^53; as int32 (the ONNX ops' accumulator)."""
    if isinstance(geometry, ConvGeometry):
        acc = F.conv2d(x, weight, None, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
    else:
        acc = x @ weight
    return acc.to(torch.int32)


def _integer_op(g: Any, x_u8: Any, weight: Any, zero_point: Any, geometry: Geometry) -> Any:
    if isinstance(geometry, ConvGeometry):
        acc = g.op("ConvInteger", x_u8, weight, zero_point, **_conv_attributes(geometry))
    else:
        acc = g.op("MatMulInteger", x_u8, weight, zero_point)
    return g.op("Cast", acc, to_i=ONNX_FLOAT)


class _DecodedWeight(torch.autograd.Function):
    """``levels[codes] * scale`` per output channel (the float path's weight, in the op's layout); ``x`` only
    anchors the node in the traced graph."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: OnnxPlan) -> torch.Tensor:  # type: ignore[override]
        w = plan.levels[plan.codes.long()]
        return w * _scale_shape(plan, plan.scale)

    @staticmethod
    def symbolic(g: Any, x: Any, plan: OnnxPlan) -> Any:
        index = g.op("Cast", _constant(g, plan.codes), to_i=ONNX_INT64)
        return g.op("Mul", _gather(g, plan.levels, index), _constant(g, _scale_shape(plan, plan.scale)))


def _scale_shape(plan: OnnxPlan, scale: torch.Tensor) -> torch.Tensor:
    """A per-output-channel vector shaped for the op's weight layout (``(C_out,)`` last for linear)."""
    return scale.reshape(-1, 1, 1, 1) if isinstance(plan.geometry, ConvGeometry) else scale


class _ActivationCodes(torch.autograd.Function):
    """``clamp(round(x / step), qmin, qmax) + offset`` as uint8; ONNX: ``QuantizeLinear`` (zero point ``offset``) of
    ``x`` by a per-tensor step, or of ``Div(x, step)`` by a unit scale for a step per sample or per token (the same
    quotient, rounded half to even as torch rounds), then a ``Clip`` for ranges narrower than uint8's. The ``Div``
    form has the same inputs for every layer that shares a quantizer (linked Q / K / V), so ONNX Runtime computes
    their codes once."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: torch.Tensor, spec: InputSpec) -> torch.Tensor:  # type: ignore[override]
        return (spec.quantize(x, step) + spec.offset).to(torch.uint8)

    @staticmethod
    def symbolic(g: Any, x: Any, step: Any, spec: InputSpec) -> Any:
        zero_point = _constant(g, torch.tensor(spec.offset, dtype=torch.uint8))
        if _rank(step) == 0:
            codes = g.op("QuantizeLinear", x, step, zero_point)
        else:
            unit = _constant(g, torch.tensor(1.0, dtype=torch.float32))
            codes = g.op("QuantizeLinear", g.op("Div", x, step), unit, zero_point)
        low, high = spec.qmin + spec.offset, spec.qmax + spec.offset
        if (low, high) == (0, UINT8_MAX):
            return codes
        bounds = [_constant(g, torch.tensor(v, dtype=torch.uint8)) for v in (low, high)]
        return g.op("Clip", codes, *bounds)


def _rank(value: Any) -> int:
    rank = value.type().dim()
    if rank is None:
        raise ValueError("ONNX export needs the rank of every activation step")
    return rank


def run_onnx_plan(plan: OnnxPlan, x: torch.Tensor, step: torch.Tensor | None) -> torch.Tensor:
    if plan.even is not None:
        x_u8 = _ActivationCodes.apply(x, step, plan.input)
        acc = _IntegerSum.apply(x_u8, plan)
        shape = plan.geometry.channel_shape(acc)
        # the native kernels' order; never Mul(Cast(acc), Mul(..)): ONNX Runtime would fuse that into a
        # MatMulIntegerToFloat that reads a per-sample step as a scalar one
        y = acc * plan.scale.to(x.dtype).reshape(shape) * step
        return y if plan.bias is None else y + plan.bias.to(x.dtype).reshape(shape)
    if plan.input is not None:
        x = plan.input.quantize(x, step) * step
    weight = plan.float_weight if plan.codes is None else _DecodedWeight.apply(x, plan)
    weight = weight.to(x.dtype)
    bias = None if plan.bias is None else plan.bias.to(x.dtype)
    if isinstance(plan.geometry, ConvGeometry):
        return plan.geometry.apply(x, weight, bias)
    y = x @ (weight.t() if plan.codes is None else weight)
    return y if bias is None else y + bias


class OnnxBackend(Backend):
    """Every layer, in ONNX's standard operators (the selection ``onnx``; :func:`asqpost.export.to_onnx`)."""

    name = "onnx"
    modes = frozenset({"onnx"})

    def eligible(self, spec: LayerSpec) -> str | None:
        return None

    def prepare(self, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> OnnxPlan:
        return onnx_plan(spec)

    def run(self, plan: OnnxPlan, x: torch.Tensor, step: torch.Tensor | None) -> torch.Tensor:
        if not x.is_cpu:
            raise ValueError("the onnx kernel selection (ONNX export) runs on CPU tensors; move the model with .cpu()")
        return run_onnx_plan(plan, x, step)

    def describe(self, plan: OnnxPlan, spec: LayerSpec) -> tuple[str, str]:
        if plan.even is not None:
            return "onnx integer", "MatMulInteger" if plan.odd is None else "two MatMulInteger (even, odd levels)"
        return "onnx float", "decoded weight" if plan.codes is not None else "float weight"


@dataclass(frozen=True, eq=False)
class EmbeddingPlan:
    """An embedding in the ``onnx`` form: ``codes`` uint8 ``(V, D)``, ``table`` float32 ``(L,)``, ``scale`` float32
    ``(V,)``: row ``i`` is ``table[codes[i]] * scale[i]``."""

    codes: torch.Tensor
    table: torch.Tensor
    scale: torch.Tensor


class _EmbeddingRows(torch.autograd.Function):
    """The rows of ``ids``; ONNX: ``Gather`` of the code rows, of their levels and of the row scales."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, plan: EmbeddingPlan) -> torch.Tensor:  # type: ignore[override]
        ids = ids.long()
        return plan.table[plan.codes[ids].long()] * plan.scale[ids].unsqueeze(-1)

    @staticmethod
    def symbolic(g: Any, ids: Any, plan: EmbeddingPlan) -> Any:
        code_rows = g.op("Gather", g.op("Cast", _constant(g, plan.codes), to_i=ONNX_UINT8), ids, axis_i=0)
        levels = g.op("Gather", _constant(g, plan.table), g.op("Cast", code_rows, to_i=ONNX_INT64), axis_i=0)
        row_scale = g.op("Gather", _constant(g, plan.scale), ids, axis_i=0)
        return g.op("Mul", levels, g.op("Unsqueeze", row_scale, _constant(g, torch.tensor([-1]))))


def embedding_rows(ids: torch.Tensor, plan: EmbeddingPlan) -> torch.Tensor:
    """An embedding lookup in the ``onnx`` form (``(*ids.shape, D)``)."""
    return _EmbeddingRows.apply(ids, plan)
