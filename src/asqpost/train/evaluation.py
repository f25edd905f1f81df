"""Evaluation of trained models: a run's final metrics (clean and shifted accuracy; for text models the cosine
to the float teacher), and the accuracy of a checkpoint or an exported (packed) file on a dataset split."""

from __future__ import annotations

import dataclasses
import itertools
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..beta_report import DEFAULT_GAINS, BetaReport, beta_report, gained_inputs, require_asq
from ..data import Normalizer, TensorBatches, TextBatches, TextSet, load_dataset
from ..devices import resolve_device
from ..export import read_packed
from ..export.onnx_runtime import OnnxRuntimeModel
from ..runconfig import RunConfig
from ..size import model_size_bytes
from ..text import is_hf_model_spec, is_text_spec, load_tokenizer, pretrained_encoder
from .checkpoint import (
    build_from_checkpoint,
    load_checkpoint,
)
from .distill import AgreementStats, evaluate_agreement
from .engine import EpochStats, evaluate
from .results import Accuracy, Agreement, ImageMetrics, TextMetrics

SHIFT_SEED = 2504


def agreement_metrics(
    model: nn.Module,
    teacher: nn.Module,
    test_batches: Any,
    device: torch.device,
    config: RunConfig,
    test: AgreementStats | None = None,
) -> TextMetrics:
    """Held-out mean and min cosine to the teacher (``test`` if the last epoch just measured it), and sizes."""
    test = test or evaluate_agreement(model, teacher, test_batches, device, config.distill_settings()["embedding"])
    return TextMetrics(
        test.cos_mean,
        test.cos_min,
        test.loss,
        test.samples,
        model_size_bytes(model),
        model_size_bytes(model, as_float=True),
    )


def final_metrics(
    model: nn.Module, test_batches: TensorBatches, device: torch.device, clean: EpochStats | None = None
) -> ImageMetrics:
    """Clean (``clean`` if the last epoch just measured it), gain-shifted and noise-shifted test accuracy, and the
    model size."""
    clean = clean or evaluate(model, test_batches, device)
    shifted = evaluate(model, dataclasses.replace(test_batches, shift_seed=SHIFT_SEED), device)
    noisy = evaluate(model, dataclasses.replace(test_batches, shift_seed=SHIFT_SEED, shift_kind="noise"), device)
    return ImageMetrics(
        clean.accuracy,
        shifted.accuracy,
        noisy.accuracy,
        model_size_bytes(model),
        model_size_bytes(model, as_float=True),
    )


def eval_batches(input_shape, norm, data, data_root, split, shift, batch_size, source, subset=None) -> TensorBatches:
    """A split's batches, normalised as the model was trained (optionally shifted), after checking its shape."""
    dataset = load_dataset(data, split, data_root).subset(subset, seed=0)
    if isinstance(dataset, TextSet):
        raise ValueError(f"{source} is an image model; {data!r} is a text dataset")
    if tuple(input_shape) != dataset.input_shape:
        raise ValueError(f"{source} expects inputs {tuple(input_shape)}; {data!r} has {dataset.input_shape}")
    normalizer = Normalizer.from_dict(norm) if norm else Normalizer.fit(dataset)
    kind = "gain" if shift is True or not shift else shift  # --shift alone is the gain shift
    return TensorBatches(dataset, batch_size, normalizer, shift_seed=SHIFT_SEED if shift else None, shift_kind=kind)


def _evaluate_model(
    model: nn.Module, input_shape, norm, data, data_root, split, shift, batch_size, source, subset=None
) -> Accuracy:
    batches = eval_batches(input_shape, norm, data, data_root, split, shift, batch_size, source, subset)
    stats = evaluate(model, batches, next(model.buffers()).device)
    return Accuracy(stats.accuracy, stats.loss, stats.samples, shift)


def evaluate_text_model(
    model: nn.Module,
    spec: dict[str, Any],
    data: str,
    data_root: str | None = None,
    split: str = "test",
    batch_size: int = 64,
    max_length: int = 128,
    subset: int | None = None,
) -> Agreement:
    """Mean and min cosine of a text model's embeddings to those of its spec's float model (read from the spec's
    folder) over a text dataset split (``subset``: the same fixed subset as a run's ``test_subset``)."""
    dataset = load_dataset(data, split, data_root).subset(subset, seed=0)
    if not isinstance(dataset, TextSet):
        raise ValueError(f"a text model is evaluated on text data; {data!r} is an image dataset")
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    teacher = pretrained_encoder(spec).to(device)
    batches = TextBatches(dataset, load_tokenizer(spec), batch_size, max_length)
    stats = evaluate_agreement(model, teacher, batches, device)
    return Agreement(stats.cos_mean, stats.cos_min, stats.samples, stats.loss)


def evaluate_export(
    path: str | Path,
    data: str,
    data_root: str | None = None,
    split: str = "test",
    shift: bool | str = False,
    batch_size: int = 500,
    device: str = "auto",
    subset: int | None = None,
) -> Accuracy | Agreement:
    """Accuracy of an exported (packed) model, computed from its packed form (text models: cosine to the float
    model, :func:`evaluate_text_model`); ``subset``: a fixed random subset of that many samples. A ``.onnx``
    file runs in ONNX Runtime on the CPU (:class:`~asqpost.export.onnx_runtime.OnnxRuntimeModel`)."""
    model, meta = _read_model(path, device)
    spec = meta.get("model")
    if is_text_spec(spec):
        _no_shift_for_text(shift)
        return evaluate_text_model(model, spec, data, data_root, split, min(batch_size, 64), subset=subset)
    if not spec or "input_shape" not in spec:
        what = f"a transformers {spec['hf_class']}" if is_hf_model_spec(spec) else "no model spec"
        raise ValueError(f"{path} records {what}, so no dataset it reads; evaluate it from Python (load_packed)")
    return _evaluate_model(
        model, spec["input_shape"], meta.get("normalizer"), data, data_root, split, shift, batch_size, path, subset
    )


def _read_model(path: str | Path, device: str) -> tuple[nn.Module, dict[str, Any]]:
    """The exported model and its metadata: a safetensors export on ``device``, an ONNX file in ONNX Runtime."""
    if Path(path).suffix.lower() != ".onnx":
        model, meta = read_packed(path)
        return model.to(resolve_device(device)), meta
    if resolve_device(device).type != "cpu":
        raise ValueError(f"{path} runs in ONNX Runtime on the CPU; pass --device cpu (or auto)")
    model = OnnxRuntimeModel(path)
    return model, model.meta


def evaluate_checkpoint(
    path: str | Path,
    data: str,
    data_root: str | None = None,
    split: str = "test",
    shift: bool | str = False,
    batch_size: int = 500,
    device: str = "auto",
    subset: int | None = None,
) -> Accuracy | Agreement:
    """Accuracy of a checkpoint on a dataset split (optionally under the per-sample gain/offset shift); text
    models: cosine to the float model (:func:`evaluate_text_model`). ``subset``: a fixed random subset of that
    many samples (a run's ``test_subset`` picks the same)."""
    payload = load_checkpoint(path)
    model = build_from_checkpoint(payload).to(resolve_device(device))
    if is_text_spec(payload["model"]):
        _no_shift_for_text(shift)
        max_length = payload.get("run", {}).get("max_length", 128)
        return evaluate_text_model(
            model, payload["model"], data, data_root, split, min(batch_size, 64), max_length, subset
        )
    return _evaluate_model(
        model,
        payload["model"]["input_shape"],
        payload.get("normalizer"),
        data,
        data_root,
        split,
        shift,
        batch_size,
        path,
        subset,
    )


def _no_shift_for_text(shift: bool | str) -> None:
    if shift:
        raise ValueError("the shifts (--shift) change images; a text model is evaluated without one")


def beta_report_checkpoint(
    path: str | Path,
    data: str,
    data_root: str | None = None,
    split: str = "test",
    shift: bool | str = False,
    gains: tuple[float, ...] = DEFAULT_GAINS,
    batch_size: int = 500,
    device: str = "auto",
    subset: int | None = None,
) -> BetaReport:
    """Beta of every ASQ layer of a checkpoint over a dataset split, at each input gain (:mod:`asqpost.beta_report`).

    ``subset`` takes the same fixed test subset as a run with ``test_subset``. Raises
    :class:`~asqpost.beta_report.NoASQLayersError` (a ``ValueError``) for a model without ASQ layers.
    """
    payload = load_checkpoint(path)
    model = build_from_checkpoint(payload).to(resolve_device(device))
    require_asq(model, str(path))
    input_shape, norm = payload["model"]["input_shape"], payload.get("normalizer")
    batches = eval_batches(input_shape, norm, data, data_root, split, shift, batch_size, path, subset)
    return beta_report(model, partial(gained_inputs, batches), gains, source=str(path))
