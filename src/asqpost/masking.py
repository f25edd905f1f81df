"""Token masks: which positions of an ``(N, T, C)`` activation are real tokens and which are padding.

The *current* mask is an ``(N, T)`` bool tensor (``True`` = real token) held in a context variable, so it
reaches every quantizer of a forward pass without a new argument on any layer. Two ways set it:

- :func:`install_mask_hooks` (called by :func:`asqpost.prepare_qat` on the prepared model) adds forward hooks
  to the model's root that read the mask from the call itself: the keyword ``attention_mask``, a mapping
  argument holding ``"attention_mask"`` (sentence-transformers modules take one ``features`` dict), or the
  positional argument in the place the root's ``forward`` names ``attention_mask``. The mask holds for that
  forward and is restored after it, also when the forward raises.
- :func:`token_mask` sets it explicitly, for models whose mask is not an argument of that name.

A call without a mask leaves an outer :func:`token_mask` in force. Users of the mask: :func:`mask_for` gives the
mask when it fits an activation (``x`` is ``(N, T, C)`` with ``(N, T)`` the mask's shape; anything else is not
masked), :func:`valid_tokens` the real tokens' rows, :func:`token_mean` the mean over real tokens only.
Calibration observers and the ASQ step adapter use them, so padding never enters calibration statistics or a
per-sample step, in calibration and in training alike.

The mask lives only while the forward runs (in its thread): activation recomputation after it (gradient
checkpointing during ``backward``) does not see it, so per-sample means recomputed there include padding.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

MASK_KEY = "attention_mask"
# a hooked module's attribute: objects whose forget() drops what they keep for one forward (a packed model's
# shared ASQ steps); the post-hook calls it when the forward ends
FORWARD_SCOPED = "asqpost_forward_scoped"

# plain lists, which torch.compile reads: the masks set by open blocks and hooked forwards (innermost last), and
# one entry per hooked forward in progress: (id of the module, whether it pushed a mask)
_masks: list[torch.Tensor | None] = []
_saved: list[tuple[int, bool]] = []


def as_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as an ``(N, T)`` bool tensor (``True`` = real token).

    Accepts bool, integer (nonzero = token) and floating masks holding only 0 and 1 (an additive mask of
    0 / -inf is refused: its meaning is the opposite). Raises ``ValueError`` otherwise.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"a token mask is an (N, T) tensor (1 = token, 0 = padding), got {shape}")
    if mask.dtype == torch.bool:
        return mask
    if (mask.is_floating_point() or mask.is_complex()) and not ((mask == 0) | (mask == 1)).all():
        raise ValueError(
            "a floating token mask (attention_mask) must hold only 0 (padding) and 1 (token); an additive "
            "mask (0 / -inf) means the opposite and is not read as one"
        )
    return mask != 0


def current_mask() -> torch.Tensor | None:
    """The token mask of the forward in progress, or ``None``."""
    return _masks[-1] if _masks else None


@contextmanager
def token_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, ``mask`` (``(N, T)``, 1 = token, 0 = padding) is the current token mask.

    For models whose padding mask is not an ``attention_mask`` argument::

        with token_mask(keep):
            model(tokens, lengths)

    ``None`` clears an outer mask for the block. A hooked model called with its own ``attention_mask``
    inside the block uses that one for its forward.
    """
    _masks.append(None if mask is None else as_token_mask(mask))
    try:
        yield
    finally:
        _masks.pop()


def mask_for(x: torch.Tensor) -> torch.Tensor | None:
    """The current mask (on ``x``'s device) if it fits ``x``: ``x`` is ``(N, T, C)``, the mask ``(N, T)``."""
    mask = current_mask()
    if mask is None or x.dim() != 3 or x.shape[:2] != mask.shape:
        return None
    return mask.to(x.device)


def valid_tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` without its padded tokens: ``(M, C)`` rows of the real tokens when the mask fits, else ``x``."""
    mask = mask_for(x)
    return x if mask is None else x[mask]


def token_mean(x: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` mean of ``(N, T, C)`` over its tokens: over the real ones only when the mask fits ``x``.

    A sample without a real token gets 0. Padded positions get a zero gradient.
    """
    mask = mask_for(x)
    return token_sum(x, mask) / token_count(x, mask, x.dtype)


def token_sum(x: torch.Tensor, mask: torch.Tensor | None, keepdim: bool = False) -> torch.Tensor:
    """``(N, C)`` sum of ``(N, T, C)`` ``x`` over its real tokens (``mask``, or all of them): ``where(mask, x, 0)``
    summed over ``T``; ``(N, 1, C)`` with ``keepdim``. Traced for ONNX it is the batched product
    ``mask (N, 1, T) @ x``, one pass that ONNX Runtime runs far faster than a masked ``ReduceSum`` (the same sum to
    float rounding)."""
    if mask is None:
        return x.sum(dim=1, keepdim=keepdim)
    if torch.onnx.is_in_onnx_export():
        sums = torch.matmul(mask.to(x.dtype).unsqueeze(1), x)
        return sums if keepdim else sums.squeeze(1)
    return torch.where(mask.unsqueeze(-1), x, x.new_zeros(())).sum(dim=1, keepdim=keepdim)


def token_count(x: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``(N, 1)`` real tokens per sample of ``(N, T, C)`` ``x`` (at least 1), or ``T`` without a mask: the
    divisor of :func:`token_mean`, so that a mask without padding gives the unmasked means bit for bit."""
    if mask is None:
        return torch.full((1, 1), x.shape[1], dtype=dtype, device=x.device)
    return mask.sum(dim=1, keepdim=True).clamp_min(1).to(dtype)


@functools.lru_cache(maxsize=256)
def _mask_position(cls: type) -> int | None:
    """Index of ``attention_mask`` among the positional parameters of ``cls.forward`` (after ``self``)."""
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    for index, param in enumerate(params):
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            return None
        if param.name == MASK_KEY:
            return index
    return None


def mask_in_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The ``attention_mask`` a call ``module(*args, **kwargs)`` passes (module docstring), or ``None``."""
    mask = kwargs.get(MASK_KEY)
    if mask is None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, Mapping) and value.get(MASK_KEY) is not None:
                mask = value[MASK_KEY]
                break
    if mask is None and args:
        position = _mask_position(type(module))
        if position is not None and position < len(args):
            mask = args[position]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None  # no mask, or one of another kind (a 4-D attention bias): not a token mask
    return as_token_mask(mask)


def _set_mask_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    mask = mask_in_call(module, args, kwargs)
    if mask is not None:
        _masks.append(None if _no_padding(mask) else mask)
    _saved.append((id(module), mask is not None))


def _no_padding(mask: torch.Tensor) -> bool:
    """A CPU mask without padding (checked without a device sync): no mask gives the same means
    (:func:`token_mean`) without the masking passes. Inside ``torch.compile`` the mask stays (no data-dependent
    branch in the graph)."""
    return mask.device.type == "cpu" and not torch.compiler.is_compiling() and bool(mask.all())


def _restore_mask_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    for item in getattr(module, FORWARD_SCOPED, ()):
        item.forget()
    if not _saved or _saved[-1][0] != id(module):
        return  # the pre-hook did not run for this call (an earlier pre-hook raised)
    _, pushed = _saved.pop()
    if pushed:
        _masks.pop()


def has_mask_hooks(model: nn.Module) -> bool:
    return any(hook is _set_mask_hook for hook in model._forward_pre_hooks.values())


def install_mask_hooks(model: nn.Module) -> nn.Module:
    """Make ``model(..., attention_mask=m)`` set the current token mask for its forward; returns ``model``.

    Forward pre/post hooks on the root (module-level functions, so they survive ``copy.deepcopy`` and
    pickling; a state dict carries no hooks, and none is needed). Installing twice is a no-op.
    """
    if not has_mask_hooks(model):
        model.register_forward_pre_hook(_set_mask_hook, with_kwargs=True, prepend=True)
        model.register_forward_hook(_restore_mask_hook, with_kwargs=True, always_call=True)
    return model
