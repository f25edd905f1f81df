"""``asqpost demo``: float training, a QAT comparison, then the deployable 4-bit model, run from its file.

:func:`run_demo` trains the config's model in float, fine-tunes it with LSQ and with ASQ + POST at 4 and 2 bits
(and in float with the same budget) through :func:`asqpost.compare.run_grid`, then :func:`deploy` exports the
4-bit POST + ASQ model as a packed file, loads it back, checks it against its fake-quant model on the test split
and times it against the float model on this machine's CPU. Every finished step is reused when the demo runs
again with the same config; the deployment step is redone (it takes seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compare import run_grid
from .data import TensorBatches
from .export import convert_to_packed, kernel_report, kernel_summary, load_packed, save_packed
from .runconfig import RunConfig
from .size import model_size_bytes
from .timing import interleaved_medians, machine_description
from .train.checkpoint import build_from_checkpoint, load_checkpoint
from .train.evaluation import eval_batches
from .train.run import fit

DEMO_METHODS = ("float", "lsq", "post-asq")
DEMO_BITS = (4, 2)
DEPLOYED = ("post-asq", 4)  # the recipe and bits of the model the demo exports
LATENCY_BATCHES = (1, 64)
LATENCY_REPEATS = 30


@dataclass(frozen=True)
class Latency:
    """Median milliseconds per forward of the float and the packed model at one batch size (CPU)."""

    batch: int
    float_ms: float
    packed_ms: float


@dataclass(frozen=True)
class Deployment:
    """The exported model as the file gives it back.

    fake_quant_accuracy / packed_accuracy: test accuracy of the QAT checkpoint and of the model loaded from the
    file, on the same batches; agreement: the share of test images on which both predict the same class.
    file_bytes: the export file; float_bytes: the float model's weights and buffers in float32.
    """

    path: Path
    file_bytes: int
    float_bytes: int
    fake_quant_accuracy: float
    packed_accuracy: float
    agreement: float
    samples: int
    kernels: str
    latency: tuple[Latency, ...]
    machine: str


@dataclass(frozen=True)
class DemoResult:
    records: list[dict[str, Any]]
    deployment: Deployment


def qat_budget(base: RunConfig) -> RunConfig:
    """QAT fine-tunes for a third of the float epochs on at most 20k images: the whole job stays short on 2 cores."""
    return base.replace(epochs=max(1, base.epochs // 3), lr=0.01, train_subset=base.train_subset or 20000)


def run_demo(base: RunConfig, out: str | Path, on_step: Callable[[str], None] | None = None) -> DemoResult:
    """The three steps (float, QAT grid at one seed, deployment); ``on_step`` is told when each begins."""
    out = Path(out)
    step = on_step or (lambda message: None)
    float_dir = out / "float"
    step(f"[1/3] float {base.model} on {base.data} ({base.epochs} epochs) -> {float_dir}")
    if not (float_dir / "final.json").is_file():
        fit(base, float_dir)
    qat = qat_budget(base)
    step(
        f"[2/3] QAT from the float model ({qat.epochs} epoch(s) on at most {qat.train_subset} images each): "
        "LSQ and ASQ + POST at 4 and 2 bits, one seed"
    )
    records = run_grid(qat, str(float_dir / "checkpoint.pt"), out / "compare", DEMO_METHODS, DEMO_BITS, (0,))
    recipe, bits = DEPLOYED
    cell = out / "compare" / "cells" / f"{recipe}-w{bits}-s0"
    export_path = out / f"{recipe}-w{bits}.safetensors"
    step(f"[3/3] export the {bits}-bit POST + ASQ model -> {export_path}; run it from the file")
    deployment = deploy(cell / "checkpoint.pt", float_dir / "checkpoint.pt", export_path, base.data, base.data_root)
    return DemoResult(records, deployment)


def deploy(
    qat_checkpoint: str | Path,
    float_checkpoint: str | Path,
    export_path: str | Path,
    data: str,
    data_root: str | None = None,
    batches: tuple[int, ...] = LATENCY_BATCHES,
    repeats: int = LATENCY_REPEATS,
) -> Deployment:
    """Export a QAT checkpoint, load the file back and measure it on CPU (see :class:`Deployment`)."""
    payload = load_checkpoint(qat_checkpoint)
    fake_quant = build_from_checkpoint(payload).eval()
    file_bytes = save_packed(
        convert_to_packed(build_from_checkpoint(payload)), export_path, payload["model"], payload.get("normalizer")
    )
    packed = load_packed(export_path)
    float_model = build_from_checkpoint(load_checkpoint(float_checkpoint)).eval()
    shape = tuple(payload["model"]["input_shape"])
    test = eval_batches(shape, payload["normalizer"], data, data_root, "test", False, 500, str(qat_checkpoint))
    fake_correct, packed_correct, agree, seen = _compare_predictions(fake_quant, packed, test)
    return Deployment(
        path=Path(export_path),
        file_bytes=file_bytes,
        float_bytes=model_size_bytes(float_model, as_float=True),
        fake_quant_accuracy=fake_correct / seen,
        packed_accuracy=packed_correct / seen,
        agreement=agree / seen,
        samples=seen,
        kernels=kernel_summary(kernel_report(packed)),
        latency=tuple(measure_latency(float_model, packed, shape, b, repeats) for b in batches),
        machine=machine_description(),
    )


@torch.no_grad()
def _compare_predictions(a: nn.Module, b: nn.Module, batches: TensorBatches) -> tuple[int, int, int, int]:
    """Correct predictions of ``a`` and of ``b``, predictions they share, and samples, over ``batches``."""
    correct_a = correct_b = agree = seen = 0
    for x, y in batches:
        pred_a, pred_b = a(x).argmax(1), b(x).argmax(1)
        correct_a += int((pred_a == y).sum())
        correct_b += int((pred_b == y).sum())
        agree += int((pred_a == pred_b).sum())
        seen += len(y)
    return correct_a, correct_b, agree, seen


@torch.no_grad()
def measure_latency(
    float_model: nn.Module, packed: nn.Module, input_shape: tuple[int, ...], batch: int, repeats: int
) -> Latency:
    """Median forward time of both models on one random CPU batch, interleaved (:func:`interleaved_medians`)."""
    x = torch.randn(batch, *input_shape)
    medians = interleaved_medians({"float": lambda: float_model(x), "packed": lambda: packed(x)}, repeats, lead_in=True)
    return Latency(batch, medians["float"] * 1e3, medians["packed"] * 1e3)
