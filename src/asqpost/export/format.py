"""The export file: safetensors tensors + one JSON metadata entry (no pickles), with checksums.

Metadata key ``asqpost`` holds JSON::

    {"format": "asqpost-packed", "version": 2,
     "model": {"name", "num_classes", "input_shape", "kwargs"}          registry spec to rebuild the float net,
              | {"name": "hf" | "minilm", "kwargs", "hf_config", "pooling", "normalize"}   or a text encoder's:
              its transformers config JSON rebuilds the architecture offline (asqpost.text)
              | null,                                                 (then load_packed needs model=)
     "qat": QATConfig JSON, "normalizer": {"mean", "std"} | null,
     "layers": {name: PackedLayer.meta()},                            geometry, bits, table size, act range
     "shared_inputs": [[lead, name, ...], ...],                       layers that shared one input quantizer
                                                                       (Q, K, V): one ASQ step per input (optional)
     "embeddings": {name: PackedEmbedding.meta()},                    sizes, bits, table size, lookup options
                                                                       (optional: absent in older exports)
     "sha256": hex digest over the rest of this metadata (canonical JSON) and every tensor (sorted names,
               raw bytes): an edit anywhere in the file is caught}

Tensors: each packed layer's ``weight.codes`` (uint8, densely packed), ``weight.table`` (float64 levels),
``weight.scale`` (float32 per output channel), ``input_quant.step`` and ``input_quant.adapter.*`` (ASQ),
``bias``; each packed embedding's ``weight.codes`` / ``weight.table`` / ``weight.scale`` (one scale per row);
plus every other tensor of the model (BatchNorm ...) under its state_dict name.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..convert import CONFIG_ATTR, quant_embeddings, quant_layers
from ..files import atomic_write_bytes
from ..masking import install_mask_hooks
from ..models import model_from_spec
from ..text import SentenceEncoder, hf_model_spec, is_pretrained_model, spec_of_encoder
from .embedding import PackedEmbedding
from .modules import PACKED_LAYERS, QUANT_TO_PACKED, PackedLayer, input_links, link_inputs, log_kernel_plan

FORMAT = "asqpost-packed"
VERSION = 2  # 2: the checksum covers the metadata too (version 1 covered the tensors only)


class ExportError(ValueError):
    """An export file is missing, corrupt, of another version, or does not match its model."""


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def convert_to_packed(model: nn.Module, single_sum: bool = False) -> nn.Module:
    """A copy of a calibrated QAT model whose quantized layers are :class:`PackedLayer` (inference form).

    The packed model computes what the fake-quant model computes (within float rounding). ``single_sum=True``
    trades that for speed: weight grids with odd powers of sqrt 2 (POST), which cost the kernels two integer
    sums per weight, are rounded onto an int8 grid (one sum; levels move by up to ``peak / 254``; see
    :func:`~asqpost.packed.single_sum_table`). Grids that already take one sum (LSQ, uniform, POT) stay exact.
    """
    layers = list(quant_layers(model))
    if not layers:
        raise ValueError("model has no quantized layers; prepare_qat + calibrate (and train) it first")
    for name, layer in layers:
        for q in (layer.weight_quantizer, layer.input_quantizer):
            if q is not None and not q.calibrated:
                raise ValueError(f"layer {name!r} is not calibrated; nothing meaningful to export")
    packed = copy.deepcopy(model).eval()
    for name, layer in layers:
        _set_submodule(packed, name, QUANT_TO_PACKED[type(layer)].from_quant(layer, single_sum))
    link_inputs(packed, _shared_input_groups(layers))
    for name, embedding in quant_embeddings(packed):  # exact in either mode: a lookup sums nothing
        _set_submodule(packed, name, PackedEmbedding.from_quant(embedding))
    log_kernel_plan(packed, "packed model")
    return packed


def _shared_input_groups(layers: list[tuple[str, nn.Module]]) -> list[list[str]]:
    """Names of the layers that share one input quantizer (Q, K, V), in groups of two or more."""
    groups: dict[int, list[str]] = {}
    for name, layer in layers:
        if layer.input_quantizer is not None:
            groups.setdefault(id(layer.input_quantizer), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def packed_layers(model: nn.Module) -> dict[str, PackedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLayer)}


def packed_embeddings(model: nn.Module) -> dict[str, PackedEmbedding]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedEmbedding)}


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_packed(
    packed: nn.Module,
    path: str | Path,
    model_spec: dict[str, Any] | None = None,
    normalizer: dict[str, Any] | None = None,
) -> int:
    """Write a packed model atomically; returns the file size in bytes.

    ``model_spec`` records what rebuilds the architecture; without one, a :class:`~asqpost.text.SentenceEncoder`
    records its transformers config, and a transformers ``PreTrainedModel`` of a class that ``transformers``
    exports its class name and config (:func:`asqpost.text.hf_model_spec`), so :func:`load_packed` needs no
    ``model=``.
    """
    if model_spec is None and isinstance(packed, SentenceEncoder):
        model_spec = spec_of_encoder(packed)
    elif model_spec is None and is_pretrained_model(packed):
        model_spec = hf_model_spec(packed)
    layers = packed_layers(packed)
    if not layers:
        raise ValueError("not a packed model: call convert_to_packed(model) first")
    tensors = {k: v.detach().cpu().contiguous() for k, v in packed.state_dict().items()}
    config = getattr(packed, CONFIG_ATTR, None)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_spec,
        "qat": None if config is None else config.to_json(),
        "normalizer": normalizer,
        "layers": {name: layer.meta() for name, layer in layers.items()},
        "shared_inputs": input_links(packed),
        "embeddings": {name: embedding.meta() for name, embedding in packed_embeddings(packed).items()},
    }
    meta["sha256"] = _digest(tensors, meta)
    data = st_save(tensors, metadata={"asqpost": json.dumps(meta)})
    atomic_write_bytes(path, data)
    return len(data)


def read_export(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify an export file: ``(metadata, tensors)``; raises :class:`ExportError`."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"export file {path} does not exist")
    raw = path.read_bytes()
    try:
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["asqpost"])
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError) as err:
        raise ExportError(f"{path} is not a readable asqpost export (truncated or corrupt?): {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{path} is not an asqpost packed export (format tag {FORMAT!r} missing)")
    if meta.get("version") != VERSION:
        raise ExportError(f"{path} has export version {meta.get('version')!r}; this asqpost reads {VERSION}")
    if meta.get("sha256") != _digest(tensors, meta):
        raise ExportError(f"{path}: metadata or tensor data do not match the recorded checksum (edited or corrupt)")
    if not isinstance(meta.get("layers"), dict) or not meta["layers"]:
        raise ExportError(f"{path}: metadata lists no packed layers")
    return meta, tensors


def _place_embeddings(model: nn.Module, embeddings: Any, path: str | Path) -> None:
    """Swap the float model's ``nn.Embedding`` for the file's packed embeddings (exports made before packed
    embeddings have none: their tables travel as float tensors)."""
    try:
        if not isinstance(embeddings, dict):
            raise TypeError(f"'embeddings' is a mapping of names to sizes, got {type(embeddings).__name__}")
        for name, embedding_meta in embeddings.items():
            geometry = PackedEmbedding.geometry_of(model.get_submodule(name))
            recorded = {key: embedding_meta[key] for key in geometry}
            if geometry != recorded:
                raise ValueError(f"embedding {name!r} is {geometry} in the model, {recorded} in the file")
            _set_submodule(model, name, PackedEmbedding(embedding_meta))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ExportError(f"{path}: embedding metadata does not fit the model: {err!r}") from err


def load_packed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a packed model from an export; ``model`` is the float architecture if the file names none."""
    return read_packed(path, model)[0]


def read_packed(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_packed`, also returning the file's metadata (one read and one checksum)."""
    meta, tensors = read_export(path)
    if model is None:
        spec = meta.get("model")
        if not spec:
            raise ExportError(f"{path} records no model spec; pass the float architecture as model=")
        try:
            model = model_from_spec(spec)
        except ValueError as err:
            raise ExportError(f"{path}: cannot rebuild its model: {err}") from err
    try:
        for name, layer_meta in meta["layers"].items():
            kind = PACKED_LAYERS[layer_meta["kind"]]
            geometry = kind.geometry_of(model.get_submodule(name))
            if geometry != layer_meta["geometry"]:
                raise ValueError(f"layer {name!r} is {geometry} in the model, {layer_meta['geometry']} in the file")
            _set_submodule(model, name, kind(layer_meta))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ExportError(f"{path}: layer metadata does not fit the model: {err!r}") from err
    _place_embeddings(model, meta.get("embeddings", {}), path)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"{path}: tensors do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise ExportError(
                f"{path}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, the model needs "
                f"{tuple(expected[name].shape)} {expected[name].dtype}"
            )
    model.load_state_dict(tensors)
    try:
        link_inputs(model, meta.get("shared_inputs", []))  # absent in exports made before
    except (AttributeError, TypeError, ValueError) as err:
        raise ExportError(f"{path}: shared input quantizers do not fit the model: {err}") from err
    for name, layer in packed_layers(model).items():
        w = layer.weight
        if w is not None and w.lut() is None and not torch.isfinite(w.table).all():
            raise ExportError(f"{path}: layer {name!r} has a non-finite level table")
    for name, embedding in packed_embeddings(model).items():
        if not torch.isfinite(embedding.weight.table).all():
            raise ExportError(f"{path}: embedding {name!r} has a non-finite level table")
    log_kernel_plan(model, str(path))
    return install_mask_hooks(model).eval(), meta  # attention_mask reaches the ASQ adapters, as when prepared
