"""Model conversion: swap float layers for quantized ones, calibrate them, save and rebuild.

``prepare_qat(model, config)`` -> a copy whose ``Conv2d``/``Linear`` layers are :class:`QuantConv2d` /
:class:`QuantLinear` (per-layer policy from the config and the layer plan of :mod:`asqpost.policy`; Q, K and V
share one input quantizer; embeddings optionally :class:`QuantEmbedding`); ``calibrate(model, batches)``
initialises every quantizer from data (SmoothQuant factors first, where configured);
``quantized_state(model)`` / ``load_quantized(float_model, state)`` round-trip a model through a plain dict of
tensors and JSON (no pickled objects).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .batches import Forward, batch_size, call_model, split_batch, to_device
from .config import LayerQuant, QATConfig, QuantizerConfig, apply_edge, apply_override, pattern_matches
from .masking import install_mask_hooks
from .nn import QUANT_LAYERS, QuantConv2d, QuantEmbedding, QuantLinear, smoothing_factors
from .policy import LayerPlan, embedding_layers, excluded_layers, plan_layers, quantizable_layers
from .quantizers import Quantizer

log = logging.getLogger(__name__)
CONFIG_ATTR = "asqpost_config"
PLAN_ATTR = "asqpost_plan"


def resolve_layer_specs(model: nn.Module, config: QATConfig, plan: LayerPlan | None = None) -> dict[str, LayerQuant]:
    """Each quantizable layer's resolved :class:`LayerQuant`.

    Excluded and unused layers (``plan``, by default :func:`plan_layers` from names) are float; the plan's
    first and last layers get ``config.first`` / ``config.last``; then the overrides apply in order.
    """
    names = [name for name, _ in quantizable_layers(model)]
    plan = plan or plan_layers(model, config)
    unknown = sorted({*plan.first, *plan.last, *plan.unused, *(n for g in plan.shared for n in g)} - set(names))
    if unknown:
        raise ValueError(f"the layer plan names {unknown[:5]}, which are no Conv2d/Linear layers of this model")
    untouched = excluded_layers(model, config) | set(plan.unused)
    specs = {name: config.default_layer() for name in names}
    for edge, value in ((plan.first, config.first), (plan.last, config.last)):
        for name in edge if value is not None else ():
            specs[name] = apply_edge(specs[name], value)
    for pattern, value in config.overrides:
        matched = [name for name in names if pattern_matches(pattern, name)]
        if not matched:
            raise ValueError(f"layer pattern {pattern!r} matches no Conv2d/Linear layer; layers are {names}")
        for name in matched:
            specs[name] = apply_override(specs[name], value)
    for name in untouched & set(names):
        specs[name] = LayerQuant(None, None)
    return specs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _share_inputs(model: nn.Module, plan: LayerPlan, specs: dict[str, LayerQuant]) -> int:
    """Give the layers of each shared group with one activation config one input quantizer (and one
    SmoothQuant ``s``); returns how many layers now use another's quantizer."""
    shared = 0
    for group in plan.shared:
        by_config: dict[QuantizerConfig, list[str]] = {}
        for name in group:
            if specs[name].act is not None:
                by_config.setdefault(specs[name].act, []).append(name)
        for names in by_config.values():
            lead = model.get_submodule(names[0])
            for name in names[1:]:
                layer = model.get_submodule(name)
                layer.input_quantizer = lead.input_quantizer
                if lead.smooth_scale is not None:
                    layer.smooth_scale = lead.smooth_scale
                shared += 1
    return shared


def _quantize_embeddings(model: nn.Module, config: QATConfig) -> int:
    quant = config.embedding_quant()
    if quant is None:
        return 0
    excluded = excluded_layers(model, config)
    chosen = [(n, m) for n, m in embedding_layers(model) if n not in excluded]
    for name, embedding in chosen:
        _set_submodule(model, name, QuantEmbedding.from_float(embedding, quant))
    return len(chosen)


def prepare_qat(
    model: nn.Module,
    config: QATConfig,
    inplace: bool = False,
    *,
    example_inputs: Any = None,
    forward: Forward | None = None,
    plan: LayerPlan | None = None,
) -> nn.Module:
    """Swap every ``Conv2d``/``Linear`` for its quantized version; returns the model (a copy unless inplace).

    Which layers are first, last, unused and which share an input quantizer is the layer plan's
    (:mod:`asqpost.policy`): given ``plan``, or probed by one float forward over ``example_inputs`` (called
    as the model is called, or through ``forward(model, inputs)``), or else decided from the layer names.
    Layers whose resolved spec is all-float stay float modules; ``config.embeddings`` swaps the embeddings
    for :class:`QuantEmbedding`. The config and plan are kept on the model (``model.asqpost_config``,
    ``model.asqpost_plan``) so :func:`quantized_state` can save them. Hooks on the returned model's root
    (:func:`asqpost.masking.install_mask_hooks`) make an ``attention_mask`` in a call mask padded tokens in its
    quantizers for that forward.
    """
    if getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("model is already prepared for QAT")
    plan = plan or plan_layers(model, config, example_inputs, forward)
    specs = resolve_layer_specs(model, config, plan)
    if not inplace:
        model = copy.deepcopy(model)
    for name, spec in specs.items():
        if spec.is_float:
            continue
        layer = model.get_submodule(name)
        _set_submodule(model, name, QUANT_LAYERS[type(layer)].from_float(layer, spec))
    shared = _share_inputs(model, plan, specs) if config.share_inputs else 0
    embeddings = _quantize_embeddings(model, config)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, PLAN_ATTR, plan)
    counts = sum(not s.is_float for s in specs.values())
    log.info(
        "prepare_qat: %d of %d layers quantized (first %s, last %s), %d share another's input quantizer, "
        "%d embeddings quantized",
        counts,
        len(specs),
        list(plan.first),
        list(plan.last),
        shared,
        embeddings,
    )
    return install_mask_hooks(model)  # model(..., attention_mask=m) masks padding in quantizers (asqpost.masking)


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantConv2d | QuantLinear]]:
    for name, m in model.named_modules():
        if isinstance(m, QuantConv2d | QuantLinear):
            yield name, m


def input_quantizers(model: nn.Module) -> list[Quantizer]:
    """Every activation quantizer of the quantized layers, once each (Q, K and V may share one)."""
    unique = {id(q): q for _, layer in quant_layers(model) if (q := layer.input_quantizer) is not None}
    return list(unique.values())


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
            layer.weight_quantizer.calibrate_(layer.folded_weight().detach())
    batches = calibrate_smoothing(model, batches, max_batches, forward)
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
        for q in input_quantizers(model):  # a quantizer shared by Q, K and V finalizes once
            q.finalize_()
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
    state = {CONFIG_ATTR: config.to_json(), "state_dict": model.state_dict()}
    plan = getattr(model, PLAN_ATTR, None)
    if plan is not None:
        state[PLAN_ATTR] = plan.to_json()
    return state


def load_quantized(float_model: nn.Module, state: dict[str, Any], strict: bool = True) -> nn.Module:
    """Rebuild a quantized model from a float model of the same architecture and :func:`quantized_state`.

    The saved layer plan (first/last/unused layers, shared input quantizers) is used when the state has one;
    states without it get the plan from names.
    """
    if not isinstance(state, dict) or CONFIG_ATTR not in state or "state_dict" not in state:
        raise ValueError(f"not an asqpost quantized state: expected keys {CONFIG_ATTR!r} and 'state_dict'")
    plan = LayerPlan.from_json(state[PLAN_ATTR]) if state.get(PLAN_ATTR) else None
    model = prepare_qat(float_model, QATConfig.from_json(state[CONFIG_ATTR]), plan=plan)
    try:
        model.load_state_dict(state["state_dict"], strict=strict)
    except RuntimeError as err:
        raise ValueError(f"quantized state does not match this model: {err}") from err
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """A float copy of a prepared model (quantized layers back to float, latent weights kept)."""
    model = copy.deepcopy(model)
    for name, layer in [*quant_layers(model), *quant_embeddings(model)]:
        _set_submodule(model, name, layer.to_float())
    setattr(model, CONFIG_ATTR, None)
    setattr(model, PLAN_ATTR, None)
    return model


def quant_embeddings(model: nn.Module) -> list[tuple[str, QuantEmbedding]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantEmbedding)]


def _smoothed_groups(model: nn.Module) -> list[list[QuantConv2d | QuantLinear]]:
    """The layers with SmoothQuant factors, grouped by the ``s`` tensor they hold (shared by Q, K and V)."""
    groups: dict[int, list[QuantConv2d | QuantLinear]] = {}
    for _, layer in quant_layers(model):
        if layer.smooth_scale is not None:
            groups.setdefault(id(layer.smooth_scale), []).append(layer)
    return list(groups.values())


@torch.no_grad()
def calibrate_smoothing(
    model: nn.Module, batches: Iterable[Any], max_batches: int | None = None, forward: Forward | None = None
) -> Iterable[Any]:
    """SmoothQuant factors of every layer with ``act.smooth``, from one float pass over ``batches``.

    Records max ``|x_j|`` per input channel, sets ``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)`` (max over
    the group's weights when Q, K and V share ``s``) and re-initialises those layers' weight quantizers on
    ``W * s``. Returns the batches to calibrate the quantizers with (``x / s`` from then on): the same
    iterable when no layer smooths, else the batches read here as a list. Called by :func:`calibrate`.
    """
    groups = _smoothed_groups(model)
    if not groups:
        return batches
    batches = list(itertools.islice(batches, max_batches))
    layers = [layer for group in groups for layer in group]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for layer in layers:
            layer.smooth_scale.fill_(1.0)
            layer.smooth_max, layer.smooth_observing = None, True
        with _observing(model):
            for batch in batches:
                call_model(model, to_device(split_batch(batch)[0], device), forward)
    finally:
        model.train(was_training)
        for layer in layers:
            layer.smooth_observing = False
        for _, layer in quant_layers(model):
            if layer.input_quantizer is not None:
                layer.input_quantizer._reset_observations()
    for group in groups:
        seen = [layer.smooth_max for layer in group if layer.smooth_max is not None]
        if not seen:
            raise ValueError("a smoothed layer saw no calibration input; is it used by the forward?")
        x_max = torch.stack(seen).amax(dim=0)
        w_max = torch.stack([layer.weight_channel_max() for layer in group]).amax(dim=0)
        group[0].smooth_scale.copy_(smoothing_factors(x_max, w_max, group[0].smooth_alpha))
        for layer in group:
            layer.smooth_max = None
            if layer.weight_quantizer is not None:
                layer.weight_quantizer.calibrate_(layer.folded_weight().detach())
    log.info("SmoothQuant factors set on %d layers", len(layers))
    return batches
