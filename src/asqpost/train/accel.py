"""Devices, mixed precision and ``torch.compile`` for training: the pieces the run and the engine share.

Mixed precision (``amp``): ``bf16`` or ``fp16`` runs the forward and the loss under ``torch.autocast`` (matmuls
and convolutions in half precision); ``fp16`` also scales the loss with a ``GradScaler``. Fake quantization
stays in float32 under autocast: :meth:`asqpost.quantizers.base.Quantizer.forward` turns autocast off and
computes ``x / s``, the rounding, the clamp, the rescale and the ASQ step adapter (its pooling, MLP and
``beta``) in float32, so the codes do not depend on half-precision rounding; the quantized tensor then enters
the layer's convolution or matmul, which autocast casts to half precision as it would any input.

``torch.compile`` (``compile``): the training model is compiled (the fused fake-quant autograd op and the ASQ
adapter trace without graph breaks); :func:`graph_breaks` counts the breaks of a model and of each quantized
layer (``torch._dynamo.explain``) so a run can report them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..batches import call_model, to_device
from ..devices import AMP_DTYPES, check_amp
from ..nn import QuantConv2d, QuantLinear


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` in ``amp``'s dtype, or a no-op context for ``off``."""
    check_amp(amp)
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A loss scaler for ``fp16`` (bf16 has float32's range and needs none); ``None`` otherwise."""
    check_amp(amp)
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def host_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` on ``device``; to CUDA through pinned memory with ``non_blocking`` copies (overlap with compute)."""
    if device.type == "cuda":
        batch = _pinned(batch)
    return to_device(batch, device, non_blocking=device.type == "cuda")


def _pinned(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory() if batch.device.type == "cpu" and not batch.is_pinned() else batch
    if isinstance(batch, Mapping):
        return {key: _pinned(value) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_pinned(value) for value in batch)
    return batch


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile(model, **options)``: the compiled module shares ``model``'s parameters and buffers."""
    return torch.compile(model, **options)  # type: ignore[return-value]


@dataclass
class GraphBreaks:
    """What ``torch._dynamo.explain`` found: graphs, breaks, their reasons, and breaks per quantized layer."""

    graphs: int
    breaks: int
    reasons: list[str] = field(default_factory=list)
    per_layer: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "breaks": self.breaks, "reasons": self.reasons, "per_layer": self.per_layer}


def graph_breaks(model: nn.Module, inputs: Any, train: bool = True) -> GraphBreaks:
    """Graph breaks of ``model`` on ``inputs`` (in train or eval mode) and of each quantized layer on the input
    it gets there. Runs on a copy under a forked random state: ``model``, its BatchNorm statistics and the
    global random streams are left as they were."""
    probe = copy.deepcopy(model).train(train)
    layer_inputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: layer_inputs.setdefault(name, args[0]))
        for name, module in probe.named_modules()
        if isinstance(module, QuantConv2d | QuantLinear)
    ]
    devices = [inputs.device] if isinstance(inputs, torch.Tensor) and inputs.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        whole = torch._dynamo.explain(lambda x: call_model(probe, x))(inputs)
        for hook in hooks:
            hook.remove()
        per_layer = {
            name: torch._dynamo.explain(probe.get_submodule(name))(x).graph_break_count
            for name, x in layer_inputs.items()
        }
    torch._dynamo.reset()
    reasons = [_reason(b) for b in whole.break_reasons]
    return GraphBreaks(whole.graph_count, whole.graph_break_count, reasons, per_layer)


def _reason(record: Any) -> str:
    where = record.user_stack[-1] if record.user_stack else None
    place = f" at {where.filename}:{where.lineno}" if where is not None else ""
    return f"{record.reason.strip().splitlines()[0]}{place}"
