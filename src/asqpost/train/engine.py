"""One epoch of training and one evaluation pass; nothing else (no I/O, no config).

The one exception is a test-only pause point (:mod:`._test_pause`, off unless ``ASQPOST_TEST_PAUSE_AT`` is set)
that the fault tests use to stop a run at a known step.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sized
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import _test_pause, distributed


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or inf; training stops before anything poisoned is saved."""


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float

    @property
    def throughput(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    epoch: int,
    progress: bool = True,
) -> EpochStats:
    """SGD over ``batches`` with a per-step LR schedule; raises :class:`TrainingDivergedError` on NaN/inf."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    pause = _test_pause.requested()
    bar = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=not progress or None, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; stopping without saving this epoch "
                "(lower the learning rate, or check the data and the quantizer steps)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = y.shape[0]
        total_loss += loss.item() * n
        correct += int((logits.argmax(dim=1) == y).sum())
        seen += n
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{seen / elapsed:.0f}")
        if pause is not None:
            pause.check(epoch + 1, step + 1, len(batches) if isinstance(batches, Sized) else None)
    totals = distributed.all_sum([total_loss, float(correct), float(seen)], device)
    return EpochStats(
        totals[0] / max(totals[2], 1), totals[1] / max(totals[2], 1), int(totals[2]), time.perf_counter() - start
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> EpochStats:
    """Loss and top-1 accuracy over ``batches`` (summed across ranks when distributed)."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y).sum())
        seen += y.shape[0]
    totals = distributed.all_sum([total_loss, float(correct), float(seen)], device)
    if totals[2] == 0:
        raise ValueError("evaluation got no samples")
    return EpochStats(totals[0] / totals[2], totals[1] / totals[2], int(totals[2]), time.perf_counter() - start)
