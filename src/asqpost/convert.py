"""Model conversion: swap float layers for quantized ones, calibrate them, save and rebuild.

``prepare_qat(model, config)`` -> a copy whose ``Conv2d``/``Linear`` layers are :class:`QuantConv2d` /
:class:`QuantLinear` (per-layer policy from the config); ``calibrate(model, batches)`` initialises every
quantizer from data; ``quantized_state(model)`` / ``load_quantized(float_model, state)`` round-trip a model
through a plain dict of tensors and JSON (no pickled objects).
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .batches import Forward, batch_size, call_model, split_batch, to_device
from .config import LayerQuant, QATConfig, apply_edge, apply_override
from .masking import install_mask_hooks
from .nn import QUANT_LAYERS, QuantConv2d, QuantLinear

log = logging.getLogger(__name__)
CONFIG_ATTR = "asqpost_config"


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every plain ``nn.Conv2d`` / ``nn.Linear``, in registration order.

    Exact types only: subclasses such as ``nn.MultiheadAttention``'s ``out_proj`` are used through their
    weights by their parent, so swapping them would silently do nothing.
    """
    return [(name, m) for name, m in model.named_modules() if type(m) in QUANT_LAYERS]


def resolve_layer_specs(model: nn.Module, config: QATConfig) -> dict[str, LayerQuant]:
    """Each quantizable layer's resolved :class:`LayerQuant` (first/last, then overrides in order)."""
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to quantize")
    names = [name for name, _ in layers]
    specs = {name: config.default_layer() for name in names}
    if config.first is not None:
        specs[names[0]] = apply_edge(specs[names[0]], config.first)
    if config.last is not None:
        specs[names[-1]] = apply_edge(specs[names[-1]], config.last)
    for pattern, value in config.overrides:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ValueError(f"layer pattern {pattern!r} matches no Conv2d/Linear layer; layers are {names}")
        for name in matched:
            specs[name] = apply_override(specs[name], value)
    return specs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def prepare_qat(model: nn.Module, config: QATConfig, inplace: bool = False) -> nn.Module:
    """Swap every ``Conv2d``/``Linear`` for its quantized version; returns the model (a copy unless inplace).

    Layers whose resolved spec is all-float stay float modules. The config is kept on the model
    (``model.asqpost_config``) so :func:`quantized_state` can save it. Hooks on the returned model's root
    (:func:`asqpost.masking.install_mask_hooks`) make an ``attention_mask`` in a call mask padded tokens in its
    quantizers for that forward.
    """
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("model is already prepared for QAT")
    specs = resolve_layer_specs(model, config)
    if not inplace:
        model = copy.deepcopy(model)
    for name, spec in specs.items():
        if spec.is_float:
            continue
        layer = model.get_submodule(name)
        _set_submodule(model, name, QUANT_LAYERS[type(layer)].from_float(layer, spec))
    setattr(model, CONFIG_ATTR, config)
    counts = sum(not s.is_float for s in specs.values())
    log.info("prepare_qat: %d of %d layers quantized", counts, len(specs))
    return install_mask_hooks(model)  # model(..., attention_mask=m) masks padding in quantizers (asqpost.masking)


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantConv2d | QuantLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, QuantConv2d | QuantLinear):
            yield name, m


@contextmanager
def _observing(model: nn.Module) -> Iterator[None]:
    acts = [q for _, layer in quant_layers(model) if (q := layer.input_quantizer) is not None]
    for q in acts:
        q.observing = True
    try:
        yield
    finally:
        for q in acts:
            q.observing = False


def _looks_like_ids_and_mask(inputs: Any, target: Any) -> bool:
    """``(input_ids, attention_mask)`` passed where ``(inputs, target)`` is read: two integer ``(N, T)``
    tensors of one shape, the second holding only 0 and 1."""
    tensors = isinstance(inputs, torch.Tensor) and isinstance(target, torch.Tensor)
    if not tensors or inputs.dim() != 2 or inputs.shape != target.shape:
        return False
    if inputs.is_floating_point() or inputs.is_complex() or target.is_floating_point() or target.is_complex():
        return False
    return bool(((target == 0) | (target == 1)).all())


def _inputs_of(batch: Any) -> tuple[Any, bool]:
    """``(model inputs, whether the batch looks like (input_ids, attention_mask))``; refuses empty batches."""
    inputs, target = split_batch(batch)
    batch_size(inputs)  # a clear ValueError for an empty batch or one without a tensor
    return inputs, _looks_like_ids_and_mask(inputs, target)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    max_batches: int | None = None,
    forward: Forward | None = None,
) -> nn.Module:
    """Initialise every quantizer of a prepared model from data, in one explicit step.

    Weight quantizers are initialised from their layer's weight; activation quantizers observe their inputs
    during float forward passes over ``batches`` (at most ``max_batches``), then initialise. A batch is what
    :mod:`asqpost.batches` defines: a tensor (``model(x)``), a mapping such as a tokenizer's
    ``BatchEncoding`` (``model(**batch)``, so ``attention_mask`` reaches the model and, through the hooks
    :func:`prepare_qat` installs, the observers: padded tokens are not observed), or ``(inputs, target)``
    whose inputs take either form or are a tuple of positional inputs (``((input_ids, mask), labels)``);
    the target is not used. ``forward(model, inputs)`` replaces the call for models taking their inputs
    another way. Inputs are moved to the model's device.

    A batch ``(input_ids, attention_mask)`` reads as ``(inputs, target)``, which would drop the mask; when a
    batch looks like one, a warning says how to pass it. The model runs in eval mode (BN statistics are not
    touched) and gets its mode back afterwards. Raises ``ValueError`` on no data, empty batches, or
    non-finite values.
    """
    layers = list(quant_layers(model))
    if not layers:
        raise ValueError("model has no quantized layers; call prepare_qat(model, config) first")
    device = next(model.parameters()).device
    for _, layer in layers:
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.calibrate_(layer.weight)
    was_training = model.training
    model.eval()
    seen = 0
    warned = False
    try:
        with _observing(model):
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                inputs, ids_and_mask = _inputs_of(batch)
                if ids_and_mask and not warned:
                    warned = True
                    log.warning(
                        "calibrate: a batch of two integer (N, T) tensors, the second all 0/1, is read as (inputs, "
                        "target) and its second tensor is not used; if it is (input_ids, attention_mask), pass "
                        "{'input_ids': ids, 'attention_mask': mask} or ((ids, mask), target)"
                    )
                call_model(model, to_device(inputs, device), forward)
                seen += 1
        if seen == 0:
            raise ValueError("calibrate() got no batches")
        for _, layer in layers:
            if layer.input_quantizer is not None:
                layer.input_quantizer.finalize_()
    finally:
        model.train(was_training)
    log.info("calibrated %d layers from %d batches", len(layers), seen)
    return model


def quantized_state(model: nn.Module) -> dict[str, Any]:
    """``{"asqpost_config": json, "state_dict": ...}``: with the float architecture, all it takes to rebuild.

    Holds only tensors, strings and plain Python values, so ``torch.load(..., weights_only=True)`` reads it.
    """
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("model was not prepared with prepare_qat(); nothing quantized to save")
    return {CONFIG_ATTR: config.to_json(), "state_dict": model.state_dict()}


def load_quantized(float_model: nn.Module, state: dict[str, Any], strict: bool = True) -> nn.Module:
    """Rebuild a quantized model from a float model of the same architecture and :func:`quantized_state`."""
    if not isinstance(state, dict) or CONFIG_ATTR not in state or "state_dict" not in state:
        raise ValueError(f"not an asqpost quantized state: expected keys {CONFIG_ATTR!r} and 'state_dict'")
    model = prepare_qat(float_model, QATConfig.from_json(state[CONFIG_ATTR]))
    try:
        model.load_state_dict(state["state_dict"], strict=strict)
    except RuntimeError as err:
        raise ValueError(f"quantized state does not match this model: {err}") from err
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """A float copy of a prepared model (quantized layers back to float, latent weights kept)."""
    model = copy.deepcopy(model)
    for name, layer in list(quant_layers(model)):
        _set_submodule(model, name, layer.to_float())
    setattr(model, CONFIG_ATTR, None)
    return model
