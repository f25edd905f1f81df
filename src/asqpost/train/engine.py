"""One epoch of training and one evaluation pass; nothing else (no I/O, no config).

Batches may take any form :mod:`asqpost.batches` defines: ``(inputs, target)`` pairs, or inputs alone (a tensor,
a dict / ``BatchEncoding`` called as ``model(**inputs)``, a tuple of positional inputs); ``forward(model, inputs)``
calls models that take their inputs another way. The loss is cross-entropy against the target (accuracy is
counted), or a ``loss_fn(outputs, target, inputs)`` of the caller's (distillation: :mod:`.distill`).

Step hooks (:func:`register_step_hook`) are called after every optimizer step: progress reports, profilers,
the fault tests' pause point.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm import tqdm

from ..batches import Forward, batch_size, call_model, split_batch
from . import distributed
from .accel import autocast, host_to_device

LossFn = Callable[[Any, Any, Any], torch.Tensor]
"""``loss_fn(outputs, target, inputs) -> scalar loss`` (``target`` is ``None`` for batches of inputs alone)."""
StepHook = Callable[[int, int, "int | None"], None]
"""``hook(epoch, step, steps_in_epoch)`` after an optimizer step (epoch and step from 1; ``None`` steps for
batches without a length)."""
_STEP_HOOKS: OrderedDict[int, StepHook] = OrderedDict()  # RemovableHandle keeps a weak reference to it


def register_step_hook(hook: StepHook) -> RemovableHandle:
    """Call ``hook`` after every optimizer step of :func:`train_one_epoch` in this process, in registration order;
    ``handle.remove()`` takes it out again."""
    handle = RemovableHandle(_STEP_HOOKS)
    _STEP_HOOKS[handle.id] = hook
    return handle


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or inf; training stops before anything poisoned is saved."""


@dataclass
class EpochStats:
    """Mean loss and top-1 accuracy (``nan`` when a ``loss_fn`` replaces classification) over ``samples``."""

    loss: float
    accuracy: float
    samples: int
    seconds: float

    @property
    def throughput(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def _classification_loss(outputs: Any, target: Any, inputs: Any) -> torch.Tensor:
    if target is None:
        raise ValueError(
            "batches hold inputs without a target: classification needs (inputs, target) pairs; pass a loss_fn "
            "(e.g. distillation) for inputs alone"
        )
    return F.cross_entropy(outputs, target)


def _correct(outputs: Any, target: Any) -> int:
    return int((outputs.argmax(dim=1) == target).sum())


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    epoch: int,
    progress: bool = True,
    forward: Forward | None = None,
    loss_fn: LossFn | None = None,
    amp: str = "off",
    scaler: torch.amp.GradScaler | None = None,
) -> EpochStats:
    """One pass over ``batches`` with a per-step LR schedule; raises :class:`TrainingDivergedError` on NaN/inf.

    ``loss_fn`` (default: cross-entropy against the batch's target, with accuracy) gets the model's outputs,
    the target (``None`` for inputs alone) and the inputs. ``amp`` (``bf16``, ``fp16`` or ``off``) runs the
    forward and the loss under autocast (:mod:`.accel`); ``scaler`` (fp16) scales the loss for the backward.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    steps = len(batches) if isinstance(batches, Sized) else None
    bar = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=not progress or None, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        inputs, target = split_batch(batch)
        inputs, target = host_to_device(inputs, device), host_to_device(target, device)
        with autocast(device, amp):
            outputs = call_model(model, inputs, forward)
            loss = (loss_fn or _classification_loss)(outputs, target, inputs)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; stopping without saving this epoch "
                "(lower the learning rate, or check the data and the quantizer steps)"
            )
        optimizer.zero_grad(set_to_none=True)
        _backward_and_step(loss, optimizer, scaler)
        scheduler.step()
        n = batch_size(inputs)
        total_loss += loss.item() * n
        correct += _correct(outputs, target) if loss_fn is None else 0
        seen += n
        elapsed = time.perf_counter() - start
        shown = {"loss": f"{total_loss / seen:.4g}", "samples_s": f"{seen / elapsed:.0f}"}
        bar.set_postfix(shown if loss_fn is not None else {**shown, "acc": f"{correct / seen:.3f}"})
        for hook in tuple(_STEP_HOOKS.values()):
            hook(epoch + 1, step + 1, steps)
    totals = distributed.all_sum([total_loss, float(correct), float(seen)], device)
    accuracy = totals[1] / max(totals[2], 1) if loss_fn is None else math.nan
    return EpochStats(totals[0] / max(totals[2], 1), accuracy, int(totals[2]), time.perf_counter() - start)


def _backward_and_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # skipped (and the scale lowered) when the fp16 gradients overflowed
    scaler.update()


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Any], device: torch.device, forward: Forward | None = None, amp: str = "off"
) -> EpochStats:
    """Cross-entropy and top-1 accuracy over ``(inputs, target)`` batches (summed across ranks when distributed),
    the forward under autocast when ``amp`` is ``bf16`` or ``fp16``."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for batch in batches:
        inputs, target = split_batch(batch)
        if target is None:
            raise ValueError("evaluate() measures accuracy and needs (inputs, target) batches")
        inputs, target = host_to_device(inputs, device), host_to_device(target, device)
        with autocast(device, amp):
            logits = call_model(model, inputs, forward)
        total_loss += F.cross_entropy(logits.float(), target, reduction="sum").item()
        correct += _correct(logits, target)
        seen += batch_size(inputs)
    totals = distributed.all_sum([total_loss, float(correct), float(seen)], device)
    if totals[2] == 0:
        raise ValueError("evaluation got no samples")
    return EpochStats(totals[0] / totals[2], totals[1] / totals[2], int(totals[2]), time.perf_counter() - start)
