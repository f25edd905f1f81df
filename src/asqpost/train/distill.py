"""Distillation QAT: the quantized model (student) learns to reproduce a frozen float teacher (its own float
version before ``prepare_qat``) on inputs alone; and the held-out agreement of the two.

The loss is ``1 - cosine`` (or the MSE) between student and teacher outputs (sentence embeddings for text
encoders), optionally plus ``hidden_weight`` times the mean over layers of each layer's relative hidden-state error
``||s - t||^2 / ||t||^2`` over real (unpadded) tokens, for models that return hidden states on
``output_hidden_states=True`` (:class:`asqpost.text.SentenceEncoder`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import Forward, call_model, split_batch, to_device
from . import distributed


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of a float model, in eval mode (no gradients, no dropout)."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Mean ``1 - cosine`` (``kind="cosine"``) or mean squared error (``"mse"``) of ``(N, D)`` outputs."""
    if student.shape != teacher.shape:
        raise ValueError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ")
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"distillation loss must be 'cosine' or 'mse', got {kind!r}")


def hidden_state_loss(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean over layers of ``||s - t||^2 / ||t||^2`` over the tokens where ``attention_mask`` is 1."""
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} hidden states, the teacher {len(teacher)}")
    terms = []
    for s, t in zip(student, teacher, strict=True):
        weights = torch.ones(s.shape[:2], device=s.device) if attention_mask is None else attention_mask.to(s.dtype)
        error = ((s - t) ** 2).sum(-1) * weights
        terms.append(error.sum() / ((t**2).sum(-1) * weights).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


@dataclass
class Distillation:
    """The distillation objective: ``forward`` and ``loss`` for :func:`.engine.train_one_epoch`.

    ``forward`` (default: :func:`asqpost.batches.call_model`'s way) calls student and teacher alike.
    """

    teacher: nn.Module
    embedding: str = "cosine"
    hidden_states: bool = False
    hidden_weight: float = 1.0
    forward: Forward | None = None

    def __post_init__(self) -> None:
        embedding_loss(torch.zeros(1, 1), torch.zeros(1, 1), self.embedding)  # validates the kind

    def student_forward(self, model: nn.Module, inputs: Any) -> Any:
        if not self.hidden_states:
            return call_model(model, inputs, self.forward)
        if self.forward is not None:
            return self.forward(model, inputs)
        if not isinstance(inputs, Mapping):
            raise ValueError("hidden-state distillation calls model(**inputs, output_hidden_states=True): give dicts")
        return model(**inputs, output_hidden_states=True)

    def loss(self, outputs: Any, target: Any, inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            expected = self.student_forward(self.teacher, inputs)
        if not self.hidden_states:
            return embedding_loss(outputs, expected, self.embedding)
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        loss = embedding_loss(outputs[0], expected[0], self.embedding)
        return loss + self.hidden_weight * hidden_state_loss(outputs[1], expected[1], mask)


@dataclass
class AgreementStats:
    """How close the student's outputs are to the teacher's over held-out inputs."""

    loss: float
    cos_mean: float
    cos_min: float
    samples: int
    seconds: float


@torch.no_grad()
def evaluate_agreement(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Any],
    device: torch.device,
    embedding: str = "cosine",
    forward: Forward | None = None,
) -> AgreementStats:
    """Mean and min cosine of student and teacher outputs, and the embedding loss, over ``batches`` (inputs
    alone or ``(inputs, target)``; targets are not used). Summed (min taken) across ranks when distributed."""
    model.eval()
    start = time.perf_counter()
    total_loss, total_cos, seen, lowest = 0.0, 0.0, 0, math.inf
    for batch in batches:
        inputs = to_device(split_batch(batch)[0], device)
        student, expected = call_model(model, inputs, forward), call_model(teacher, inputs, forward)
        cos = F.cosine_similarity(student.flatten(1).double(), expected.flatten(1).double(), dim=1)
        n = cos.shape[0]
        total_loss += embedding_loss(student, expected, embedding).item() * n
        total_cos += cos.sum().item()
        lowest = min(lowest, cos.min().item())
        seen += n
    total_loss, total_cos, count = distributed.all_sum([total_loss, total_cos, float(seen)], device)
    lowest = _all_min(lowest, device)
    if count == 0:
        raise ValueError("evaluation got no samples")
    return AgreementStats(total_loss / count, total_cos / count, lowest, int(count), time.perf_counter() - start)


def _all_min(value: float, device: torch.device) -> float:
    if not distributed.active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return t.item()
