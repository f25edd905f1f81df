"""What a batch is, and how a model is called with it: tensors, tuples and dicts alike.

A *batch* from a loader is either model inputs alone, or ``(inputs, target)``. *Inputs* are what the model
takes, in one of three forms, and :func:`call_model` calls the model the matching way:

- a tensor ``x``: ``model(x)``;
- a mapping (a ``dict``, or a Hugging Face ``BatchEncoding``): ``model(**inputs)``, so ``attention_mask``
  and every other key reach the model by name;
- a tuple or list of positional inputs: ``model(*inputs)``.

:func:`split_batch` takes a batch apart: a tensor or a mapping is inputs alone (no target); a tuple or list
must be ``(inputs, target)``, exactly two items, and its first item is the inputs in any of the forms above
(``((input_ids, attention_mask), labels)`` passes two positional inputs). Other lengths are refused rather than
guessed at, so nothing in a batch is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

Forward = Callable[[nn.Module, Any], Any]
"""A user function ``forward(model, inputs) -> outputs``, for models that take their inputs another way."""


def split_batch(batch: Any) -> tuple[Any, Any | None]:
    """``(inputs, target)`` of a batch; ``target`` is ``None`` for a tensor or a mapping."""
    if isinstance(batch, torch.Tensor | Mapping):
        return batch, None
    if isinstance(batch, tuple | list):
        if len(batch) != 2:
            raise ValueError(
                f"a batch tuple is (inputs, target), got {len(batch)} items: pass several positional inputs as "
                "((a, b), target), keyword inputs as a dict, or give a forward function"
            )
        return batch[0], batch[1]
    raise ValueError(f"a batch is a tensor, a mapping, or an (inputs, target) pair, got {type(batch).__name__}")


def call_model(model: nn.Module, inputs: Any, forward: Forward | None = None) -> Any:
    """The model's output for ``inputs`` (module docstring), or ``forward(model, inputs)`` when given."""
    if forward is not None:
        return forward(model, inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def to_device(inputs: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``inputs`` with every tensor in it (nested in mappings, tuples and lists) moved to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=non_blocking)
    if isinstance(inputs, Mapping):
        return {key: to_device(value, device, non_blocking) for key, value in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(to_device(value, device, non_blocking) for value in inputs)
    return inputs


def first_tensor(inputs: Any) -> torch.Tensor | None:
    """The first tensor in ``inputs`` (depth first, mapping order), or ``None``."""
    if isinstance(inputs, torch.Tensor):
        return inputs
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, tuple | list) else ()
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def batch_size(inputs: Any) -> int:
    """The number of samples in ``inputs``: the first tensor's leading dimension.

    Raises ``ValueError`` when ``inputs`` holds no tensor, or an empty one.
    """
    x = first_tensor(inputs)
    if x is None:
        raise ValueError(f"model inputs hold no tensor (got {type(inputs).__name__})")
    if x.dim() == 0 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"batch is empty (shape {tuple(x.shape)})")
    return int(x.shape[0])
