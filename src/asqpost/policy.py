"""The layer plan: which layers are "first" and "last", which are unused, and which read the same input.

:func:`plan_layers` decides it in one of two ways:

* **Probe** (``example_inputs`` given): one float forward pass, called as the model is called
  (:func:`asqpost.batches.call_model`, or the user's ``forward``), with hooks on every layer and the autograd
  graph as the record of what feeds what:

  - *unused*: layers whose output does not reach the model's output (a ``BertModel``'s pooler when the
    forward pools the token embeddings), or that never run;
  - *first*: the used layers whose input depends on no other candidate layer: every consumer of the
    embeddings (Q, K and V of an encoder's first block), or a CNN's stem;
  - *last*: the used layers that no other used layer depends on: the layers at the end of the output path
    (a CNN's classifier; an encoder's last ``output.dense`` when its tokens are pooled);
  - *shared*: groups of used layers that read the very same input tensor (Q, K and V of every block).

* **Names** (no example inputs; also what a saved model without a plan rebuilds with): first is the first
  candidate layer in registration order, last the last one, together with their Q/K/V siblings; shared are
  the sibling triples named as attention projections read (:data:`QKV_NAMES`: ``query/key/value``,
  ``q_proj/k_proj/v_proj``, ...) with equal input widths. A Hugging Face ``transformers`` pooler
  (a module named ``pooler``) is assumed unused and left float: sentence encoders pool the token embeddings.
  Pass example inputs where that is wrong, or for cross-attention, where K and V read another input.

Candidates are the plain ``nn.Conv2d`` / ``nn.Linear`` layers (:func:`quantizable_layers`) minus the config's
``exclude`` patterns. The plan is plain data (:meth:`LayerPlan.to_dict`): :func:`asqpost.convert.quantized_state`
saves it, so a model prepared from a probe rebuilds exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batches import Forward, call_model
from .config import QATConfig, pattern_matches
from .nn import QUANT_LAYERS

QKV_NAMES = (
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_lin", "k_lin", "v_lin"),
    ("to_q", "to_k", "to_v"),
)
EMBEDDING_TYPES = (nn.Embedding,)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every plain ``nn.Conv2d`` / ``nn.Linear``, in registration order.

    Exact types only: subclasses such as ``nn.MultiheadAttention``'s ``out_proj`` are used through their
    weights by their parent, so swapping them would silently do nothing.
    """
    return [(name, m) for name, m in model.named_modules() if type(m) in QUANT_LAYERS]


def embedding_layers(model: nn.Module) -> list[tuple[str, nn.Embedding]]:
    """``(name, layer)`` of every plain ``nn.Embedding``, in registration order."""
    return [(name, m) for name, m in model.named_modules() if type(m) in EMBEDDING_TYPES]


@dataclass(frozen=True)
class LayerPlan:
    """The layers' roles (module docstring). ``probed``: decided by a forward pass, not by names."""

    first: tuple[str, ...]
    last: tuple[str, ...]
    unused: tuple[str, ...] = ()
    shared: tuple[tuple[str, ...], ...] = ()
    probed: bool = False

    def to_json(self) -> str:
        return json.dumps(
            {
                "first": list(self.first),
                "last": list(self.last),
                "unused": list(self.unused),
                "shared": [list(g) for g in self.shared],
                "probed": self.probed,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> LayerPlan:
        data = json.loads(text)
        if not isinstance(data, dict) or not {"first", "last"} <= set(data):
            raise ValueError(f"not a layer plan: {text[:200]!r}")
        return cls(
            first=tuple(data["first"]),
            last=tuple(data["last"]),
            unused=tuple(data.get("unused", ())),
            shared=tuple(tuple(g) for g in data.get("shared", ())),
            probed=bool(data.get("probed", False)),
        )


def excluded_layers(model: nn.Module, config: QATConfig) -> set[str]:
    """Names of the layers and embeddings the config's ``exclude`` patterns select; each must select one."""
    names = [n for n, _ in quantizable_layers(model)] + [n for n, _ in embedding_layers(model)]
    excluded: set[str] = set()
    for pattern in config.exclude:
        matched = [n for n in names if pattern_matches(pattern, n)]
        if not matched:
            raise ValueError(f"exclude pattern {pattern!r} matches no layer or embedding; they are {names}")
        excluded.update(matched)
    return excluded


def plan_layers(
    model: nn.Module, config: QATConfig, example_inputs: Any = None, forward: Forward | None = None
) -> LayerPlan:
    """The model's :class:`LayerPlan`: from a probe forward over ``example_inputs``, or from names."""
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear layer to quantize")
    excluded = excluded_layers(model, config)
    candidates = [(n, m) for n, m in layers if n not in excluded]
    if not candidates:
        raise ValueError("every layer is excluded; nothing left to quantize")
    if example_inputs is None and forward is None:
        return _plan_from_names(model, candidates)
    return _plan_from_probe(model, candidates, example_inputs, forward)


def _is_transformers_pooler(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    if "pooler" not in parts:
        return False
    pooler = model.get_submodule(".".join(parts[: parts.index("pooler") + 1]))
    return type(pooler).__module__.startswith("transformers.")


def _name_groups(candidates: list[tuple[str, nn.Module]]) -> list[tuple[str, ...]]:
    """Sibling Q/K/V triples (:data:`QKV_NAMES`) with equal input widths, in registration order."""
    layers = dict(candidates)
    groups = []
    for name in layers:
        parent, _, child = name.rpartition(".")
        for triple in QKV_NAMES:
            if child != triple[0]:
                continue
            members = [f"{parent}.{c}" if parent else c for c in triple]
            if all(m in layers for m in members) and len({layers[m].weight.shape[1] for m in members}) == 1:
                groups.append(tuple(members))
    return groups


def _with_group(name: str, groups: list[tuple[str, ...]]) -> tuple[str, ...]:
    return next((g for g in groups if name in g), (name,))


def _plan_from_names(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> LayerPlan:
    unused = tuple(n for n, _ in candidates if _is_transformers_pooler(model, n))
    used = [(n, m) for n, m in candidates if n not in unused] or candidates
    groups = _name_groups(used)
    return LayerPlan(
        first=_with_group(used[0][0], groups),
        last=_with_group(used[-1][0], groups),
        unused=tuple(n for n in unused if n not in dict(used)),
        shared=tuple(groups),
    )


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every floating tensor in a model output (tensors, mappings such as ``ModelOutput``, tuples, lists)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _tensors(v)


def _reached(tensors: list[torch.Tensor], owners: dict[int, str]) -> set[str]:
    """Names of the layers whose weight the autograd graph of ``tensors`` reaches (what they depend on)."""
    found: set[str] = set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen: set[Any] = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None and id(variable) in owners:
            found.add(owners[id(variable)])
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def _plan_from_probe(
    model: nn.Module, candidates: list[tuple[str, nn.Module]], example_inputs: Any, forward: Forward | None
) -> LayerPlan:
    names = [n for n, _ in candidates]
    inputs: dict[str, torch.Tensor] = {}  # each layer's first input, held so that ids stay unique

    def hook(name: str):
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in inputs and args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0]

        return record

    owners = {id(layer.weight): name for name, layer in candidates}
    grad_flags = [(layer.weight, layer.weight.requires_grad) for _, layer in candidates]
    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in candidates]
    was_training = model.training
    model.eval()
    try:
        for weight, _ in grad_flags:
            weight.requires_grad_(True)
        with torch.enable_grad():
            output = call_model(model, example_inputs, forward)
        used = _reached(list(_tensors(output)), owners)
        depends = {n: _reached([inputs[n]], owners) & used for n in names if n in used and n in inputs}
    finally:
        for handle in handles:
            handle.remove()
        for weight, flag in grad_flags:
            weight.requires_grad_(flag)
        model.train(was_training)
    if not depends:
        raise ValueError("the probe forward used none of the layers: check example_inputs / forward")
    order = [n for n in names if n in depends]
    by_input: dict[int, list[str]] = {}
    for n in order:
        by_input.setdefault(id(inputs[n]), []).append(n)
    return LayerPlan(
        first=tuple(n for n in order if not depends[n]),
        last=tuple(n for n in order if not any(n in depends[m] for m in order if m != n)),
        unused=tuple(n for n in names if n not in depends),
        shared=tuple(tuple(g) for g in by_input.values() if len(g) > 1),
        probed=True,
    )
