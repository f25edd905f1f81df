"""ONNX export: a packed model as a standard ONNX graph that ONNX Runtime runs on integers.

:func:`to_onnx` traces the model under the ``onnx`` kernel selection (:mod:`asqpost.kernels.onnx_graph`): each
packed layer with an integer form becomes activation codes (``QuantizeLinear`` to uint8 with the zero point
``-qmin`` for a signed range, a ``Clip`` for a range narrower than uint8's), its b-bit weight codes behind
``Gather`` of the int8 level table, ``MatMulInteger`` / ``ConvInteger`` (two of them, on the even and odd tables,
for POST's exact grid) and the float rescale and bias; the ASQ step is computed in the graph by the adapter's own
ops (the masked token sum as a ``MatMul``, ``ReduceMean``, ``Gemm``, ``Relu``, ``Softplus``, ``Pow``); SmoothQuant
and rotations are folded as in the packed layer; packed embeddings gather their rows from the codes. Weight codes
are stored as ``uint4`` (two per byte), so a 4-bit file is half an int8 one; ONNX Runtime folds each ``Gather``
into an int8 weight when it loads the model.

The file carries asqpost's metadata (key ``asqpost`` of ``metadata_props``, JSON)::

    {"format": "asqpost-onnx", "version": 1, "asqpost": version, "model": spec | null,
     "normalizer": {"mean", "std"} | null, "inputs": [names], "outputs": [names],
     "sha256": hex digest of the serialized graph}

so ``asqpost run model.onnx`` finds the dataset shape and normalisation, and an edited graph is caught.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..convert import quant_layers
from ..files import atomic_write_bytes
from ..kernels import use_kernel
from ..kernels.onnx_graph import integer_form
from ..text import MissingExtraError, SentenceEncoder, hf_model_spec, is_pretrained_model, spec_of_encoder
from ..version import __version__
from .embedding import PackedEmbedding
from .format import ExportError, convert_to_packed, packed_layers

ONNX_FORMAT = "asqpost-onnx"
ONNX_VERSION = 1
OPSET = 21  # the first opset with uint4 tensors
META_KEY = "asqpost"
UINT4_MAX = 15


def onnx_module() -> Any:
    """The ``onnx`` package, or a :class:`~asqpost.text.MissingExtraError` naming the extra."""
    try:
        import onnx
    except ImportError as err:
        raise MissingExtraError('ONNX export needs the onnx package: pip install "asq-post[onnx]"') from err
    return onnx


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`to_onnx` wrote: the file, its size, the graph's input and output names, and how many packed
    layers run on integers (``MatMulInteger`` / ``ConvInteger``) and how many on decoded float weights."""

    path: Path
    size_bytes: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    integer_layers: int
    float_layers: int


class _Called(nn.Module):
    """``model`` called with positional tensors: by keyword when the example inputs were a mapping; a mapping
    output (a transformers ``ModelOutput``) becomes its tensors in order."""

    def __init__(self, model: nn.Module, keywords: tuple[str, ...] | None):
        super().__init__()
        self.model = model
        self.keywords = keywords

    def forward(self, *tensors: torch.Tensor) -> Any:
        out = self.model(**dict(zip(self.keywords, tensors, strict=True))) if self.keywords else self.model(*tensors)
        if isinstance(out, Mapping):
            return tuple(v for v in out.values() if isinstance(v, torch.Tensor))
        return out


def packed_for_export(model: nn.Module, single_sum: bool = False) -> nn.Module:
    """``model`` if it is packed, else its packed copy (:func:`~asqpost.export.convert_to_packed`); raises
    ``ValueError`` for a model with neither packed nor quantized layers."""
    if packed_layers(model):
        return model
    if any(True for _ in quant_layers(model)):
        return convert_to_packed(model, single_sum)
    raise ValueError("model has no packed or quantized layers: prepare_qat + calibrate it (or convert_to_packed)")


def _check_exportable(model: nn.Module) -> None:
    """Refuse, by name, what the ONNX graph cannot express."""
    for name, module in model.named_modules():
        if isinstance(module, PackedEmbedding) and module.max_norm is not None:
            raise ValueError(f"embedding {name!r} renormalises its rows (max_norm): ONNX export does not express it")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_cpu:
            raise ValueError(f"ONNX export traces on the CPU; {name!r} is on {tensor.device}: call model.cpu()")


def _inputs(example_inputs: Any) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...] | None]:
    """``(tensors, keywords)``: a mapping's values and keys, or a tensor / sequence of tensors and ``None``."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), None
    if isinstance(example_inputs, Mapping):
        items = [(k, v) for k, v in example_inputs.items() if v is not None]
        tensors, keywords = tuple(v for _, v in items), tuple(k for k, _ in items)
    elif isinstance(example_inputs, Sequence):
        tensors, keywords = tuple(example_inputs), None
    else:
        raise ValueError(f"example_inputs is a tensor, a sequence or a mapping of tensors, got {type(example_inputs)}")
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError("example_inputs must hold at least one tensor, and only tensors")
    return tensors, keywords


def _with_padding(tensors: tuple[torch.Tensor, ...], keywords: tuple[str, ...] | None) -> tuple[torch.Tensor, ...]:
    """The example with one padded position (zeros, ``attention_mask`` 0) when its mask has none: transformers
    drops an all-ones mask in Python, so a trace of such an example would ignore the mask at every shape."""
    if not keywords or "attention_mask" not in keywords:
        return tensors
    mask = tensors[keywords.index("attention_mask")]
    if mask.dim() != 2 or not bool((mask != 0).all()):
        return tensors
    return tuple(
        torch.cat([t, t.new_zeros(t.shape[0], 1)], dim=1) if t.dim() == 2 and t.shape == mask.shape else t
        for t in tensors
    )


def _default_axes(tensors: tuple[torch.Tensor, ...], names: tuple[str, ...], text: bool) -> dict[str, dict[int, str]]:
    """Batch dynamic on every input; for a text model (token inputs) the sequence too."""
    axes = {}
    for name, tensor in zip(names, tensors, strict=True):
        axes[name] = {0: "batch", 1: "sequence"} if text and tensor.dim() == 2 else {0: "batch"}
    return axes


def _model_spec(model: nn.Module, model_spec: dict[str, Any] | None) -> dict[str, Any] | None:
    if model_spec is not None:
        return model_spec
    if isinstance(model, SentenceEncoder):
        return spec_of_encoder(model)
    return hf_model_spec(model) if is_pretrained_model(model) else None


def to_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    model_spec: dict[str, Any] | None = None,
    normalizer: dict[str, Any] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    single_sum: bool = False,
) -> OnnxExport:
    """Write ``model`` (packed, or a calibrated QAT model, packed on a copy) as an ONNX file, atomically.

    ``example_inputs``: a tensor, a tuple of tensors (positional) or a mapping (keywords: a text model's
    ``{"input_ids": ..., "attention_mask": ...}``; the mask is then a graph input that the ASQ steps read).
    Names default to the mapping's keys (else ``input``, ``input_1``...) and ``output`` (``output_1``...);
    axis 0 is dynamic on every input and output, and for 2-D inputs of a mapping the sequence axis as well.
    ``model_spec`` and ``normalizer`` go into the file's metadata (for ``asqpost run``); a
    :class:`~asqpost.text.SentenceEncoder` or a transformers model records its own spec.

    Raises ``ValueError`` for what the graph cannot express (named), and :class:`ExportError` when tracing fails.
    """
    onnx = onnx_module()
    packed = packed_for_export(model, single_sum)
    _check_exportable(packed)
    tensors, keywords = _inputs(example_inputs)
    tensors = _with_padding(tensors, keywords)
    names = tuple(input_names) if input_names else keywords or _numbered("input", len(tensors))
    wrapper = _Called(packed, keywords)
    was_training = packed.training
    packed.eval()
    try:
        with torch.no_grad(), use_kernel("onnx"):
            out = wrapper(*tensors)  # builds every plan outside the trace: their tensors become constants
            outputs = tuple(output_names) if output_names else _numbered("output", len(_flat(out)))
            axes = dynamic_axes or {
                **_default_axes(tensors, names, keywords is not None),
                **{n: {0: "batch"} for n in outputs},
            }
            graph = _trace(wrapper, tensors, names, outputs, axes)
    finally:
        packed.train(was_training)
    proto = onnx.load_from_string(graph)
    _codes_as_uint4(onnx, proto)
    _share_constants(onnx, proto)
    _short_value_names(proto, set(names) | set(outputs))
    meta = {
        "format": ONNX_FORMAT,
        "version": ONNX_VERSION,
        "asqpost": __version__,
        "model": _model_spec(model, model_spec),
        "normalizer": normalizer,
        "inputs": list(names),
        "outputs": list(outputs),
        "sha256": graph_digest(proto),
    }
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta)})
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    atomic_write_bytes(path, data)
    counts = _layer_counts(packed)
    return OnnxExport(Path(path), len(data), names, outputs, *counts)


def _numbered(stem: str, count: int) -> tuple[str, ...]:
    return tuple(stem if i == 0 else f"{stem}_{i}" for i in range(count))


def _flat(out: Any) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def _addcdiv(g: Any, self: Any, tensor1: Any, tensor2: Any, value: Any) -> Any:
    """``aten::addcdiv`` (the scale-form ASQ adapter's first layer) as ``self + value * (tensor1 / tensor2)``:
    torch's arithmetic (no ``Mul`` for ``value = 1``), so the same bits."""
    from torch.onnx import symbolic_helper

    quotient = g.op("Div", tensor1, tensor2)
    if symbolic_helper._maybe_get_const(value, "f") != 1:
        quotient = g.op("Mul", quotient, g.op("Cast", value, to_i=onnx_module().TensorProto.FLOAT))
    return g.op("Add", self, quotient)


def _trace(wrapper: nn.Module, tensors: tuple, names: tuple, outputs: tuple, axes: dict) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.register_custom_op_symbolic("aten::addcdiv", _addcdiv, OPSET)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values it takes as constants
            torch.onnx.export(
                wrapper,
                tensors,
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=list(names),
                output_names=list(outputs),
                dynamic_axes=axes,
                autograd_inlining=False,
                do_constant_folding=False,  # folding would decode the codes into int8 weights in the file
            )
    except (RuntimeError, IndexError, torch.onnx.errors.OnnxExporterError) as err:
        raise ExportError(f"the model could not be traced to ONNX: {err}") from err
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::addcdiv", OPSET)
    return buffer.getvalue()


def _codes_as_uint4(onnx: Any, proto: Any) -> None:
    """Store every uint8 constant that holds codes below 16 and only feeds ``Cast`` as ``uint4`` (two per byte,
    the first in the low nibble): the weight and embedding codes."""
    consumers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    for node in proto.graph.node:
        if node.op_type != "Constant" or consumers.get(node.output[0]) != {"Cast"}:
            continue
        attribute = node.attribute[0]
        if attribute.name != "value" or attribute.t.data_type != onnx.TensorProto.UINT8:
            continue
        codes = onnx.numpy_helper.to_array(attribute.t).reshape(-1)
        if codes.size == 0 or int(codes.max()) > UINT4_MAX:
            continue
        pairs = codes if codes.size % 2 == 0 else np.concatenate([codes, np.zeros(1, dtype=codes.dtype)])
        packed = (pairs[0::2] | (pairs[1::2] << 4)).astype("uint8").tobytes()
        dims = list(attribute.t.dims)
        attribute.t.CopyFrom(onnx.helper.make_tensor(attribute.t.name, onnx.TensorProto.UINT4, dims, packed, raw=True))


def _share_constants(onnx: Any, proto: Any) -> None:
    """One copy of each constant value: consumers of an equal ``Constant`` or initializer read the first one, so
    ONNX Runtime's common-subexpression pass merges what layers compute alike (a shared quantizer's step and
    codes for Q / K / V), and the file holds each value once."""
    graph = proto.graph
    canonical: dict[bytes, str] = {}
    alias: dict[str, str] = {}

    def seen(name: str, tensor: Any) -> bool:
        key = _value_key(onnx, tensor)
        if key in canonical:
            alias[name] = canonical[key]
            return True
        canonical[key] = name
        return False

    kept = [t for t in graph.initializer if not seen(t.name, t)]
    nodes = [n for n in graph.node if not (_is_constant(n) and seen(n.output[0], n.attribute[0].t))]
    if not alias:
        return
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(nodes)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
    for output in graph.output:
        if output.name in alias:
            raise ExportError(f"graph output {output.name!r} is a constant")


def _is_constant(node: Any) -> bool:
    return node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value"


def _value_key(onnx: Any, tensor: Any) -> bytes:
    """The SHA-256 of ``tensor`` serialized without its name: type, shape and contents."""
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = ""
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()


def _short_value_names(proto: Any, kept: set[str]) -> None:
    """Name every intermediate value ``v<i>`` (the tracer's names repeat the module path at every use: 5% of a
    4-bit MiniLM file); graph inputs, outputs and initializers keep theirs, nodes keep their module-path names."""
    graph = proto.graph
    if any(a.g.ByteSize() or len(a.graphs) for node in graph.node for a in node.attribute):
        return  # a subgraph may read outer values by name
    renamed: dict[str, str] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        for i, name in enumerate(node.output):
            if name and name not in kept:
                renamed[name] = node.output[i] = f"v{len(renamed)}"
    for info in graph.value_info:
        info.name = renamed.get(info.name, info.name)


def graph_digest(proto: Any) -> str:
    """SHA-256 of the serialized graph (what the metadata's ``sha256`` records)."""
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


def _layer_counts(model: nn.Module) -> tuple[int, int]:
    specs = [layer.spec() for layer in packed_layers(model).values()]
    integer = sum(1 for spec in specs if integer_form(spec))
    return integer, len(specs) - integer


def read_onnx_metadata(path: str | Path) -> tuple[dict[str, Any], bytes]:
    """Read and verify an asqpost ONNX file: ``(metadata, file bytes)``; raises :class:`ExportError`."""
    onnx = onnx_module()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX file {path} does not exist")
    raw = path.read_bytes()
    try:
        proto = onnx.load_from_string(raw)
        props = {p.key: p.value for p in proto.metadata_props}
        meta = json.loads(props[META_KEY])
    except Exception as err:  # protobuf's DecodeError, a missing key, bad JSON: the file is not ours or corrupt
        raise ExportError(f"{path} is not a readable asqpost ONNX export (truncated or corrupt?): {err!r}") from err
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise ExportError(f"{path} is not an asqpost ONNX export (format tag {ONNX_FORMAT!r} missing)")
    if meta.get("version") != ONNX_VERSION:
        raise ExportError(f"{path} has ONNX export version {meta.get('version')!r}; this asqpost reads {ONNX_VERSION}")
    if meta.get("sha256") != graph_digest(proto):
        raise ExportError(f"{path}: the graph does not match the recorded checksum (edited or corrupt)")
    return meta, raw
