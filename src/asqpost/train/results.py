"""What training and evaluation return: typed results, whose ``to_dict()`` is the JSON that ``final.json`` and
the command line's ``--json`` hold."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ImageMetrics:
    """A finished image run on its test split: clean, gain-shifted and noise-shifted top-1 accuracy (0..1), and
    the model's size in bytes (quantized weights at their bits; ``float_size_bytes``: all in float32)."""

    test_acc: float
    shift_acc: float
    noise_acc: float
    size_bytes: int
    float_size_bytes: int


@dataclass(frozen=True)
class TextMetrics:
    """A finished distillation run of a text model: held-out mean and min cosine to the float teacher, the
    distillation loss, the texts, and the sizes as in :class:`ImageMetrics`."""

    test_cos_mean: float
    test_cos_min: float
    test_loss: float
    test_samples: int
    size_bytes: int
    float_size_bytes: int


@dataclass(frozen=True)
class FitResult:
    """What :func:`asqpost.train.run.fit` returns: the per-epoch ``history`` and, when the last epoch is done,
    the final ``metrics``; a run stopped early (``stop_after``) has ``stopped_after_epoch`` instead."""

    history: list[dict[str, Any]]
    metrics: ImageMetrics | TextMetrics | None = None
    stopped_after_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """``final.json``'s content: the metrics' fields and the history (or the epoch it stopped after)."""
        if self.metrics is None:
            return {"stopped_after_epoch": self.stopped_after_epoch, "history": self.history}
        return {**dataclasses.asdict(self.metrics), "history": self.history}


@dataclass(frozen=True)
class Accuracy:
    """An image model evaluated on a split: top-1 accuracy (0..1), mean cross-entropy, samples, and the shift
    applied (``False``, or ``"gain"`` / ``"noise"``)."""

    accuracy: float
    loss: float
    samples: int
    shift: bool | str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Agreement:
    """A text model evaluated on a split: mean and min cosine of its embeddings to the float model's, texts, and
    the mean loss (1 - cosine, or the MSE)."""

    cos_mean: float
    cos_min: float
    samples: int
    loss: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
