"""A whole training run (:func:`fit`): calibration, epochs, resume, checkpoints and metrics; the data and model
come from :mod:`.loading`, the final metrics from :mod:`.evaluation`.

``fit(config, out_dir)`` writes into ``out_dir``:

    config.yaml        the resolved run config
    checkpoint.pt      after every epoch, atomically (the resume point)
    metrics.csv/json   one row per epoch
    final.json         clean and shifted test accuracy, model size, when the last epoch is done
                       (distillation: mean and min held-out cosine to the float teacher, model size)

Text encoders (``model: hf`` / ``minilm``, :mod:`asqpost.text`) train on text data (``data: fortunes``) in dict
batches from the model's own tokenizer. With ``loss: distill`` the teacher is the float model before
``prepare_qat``, rebuilt from the same spec and weights on resume (checkpoints do not store it).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..adapters import StepAdapter
from ..batches import split_batch, to_device
from ..config import QATConfig
from ..convert import calibrate
from ..data import TensorBatches, TextBatches
from ..devices import resolve_device
from ..files import atomic_write_bytes
from ..runconfig import RunConfig
from . import distributed
from .accel import compile_model, grad_scaler, graph_breaks
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    qat_json,
    save_checkpoint,
)
from .distill import AgreementStats, Distillation, evaluate_agreement
from .engine import EpochStats, evaluate, train_one_epoch
from .evaluation import agreement_metrics, final_metrics
from .loading import Prepared, prepare
from .results import FitResult, ImageMetrics, TextMetrics

log = logging.getLogger(__name__)


def _batches(
    config: RunConfig, prep: Prepared, dist_info: distributed.DistInfo, train: bool
) -> TensorBatches | TextBatches:
    if prep.is_text:
        return TextBatches(
            prep.train if train else prep.test,  # type: ignore[arg-type]
            prep.tokenizer,
            config.batch_size if train else config.eval_batch_size,
            config.max_length,
            shuffle=train,
            seed=config.seed,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            drop_last=train and dist_info.enabled,
        )
    return TensorBatches(
        prep.train if train else prep.test,
        config.batch_size if train else config.eval_batch_size,
        prep.normalizer,
        shuffle=train,
        augment=config.augment if train else "none",
        gain_augment=config.gain_augment if train else None,
        seed=config.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        drop_last=train and dist_info.enabled,
    )


def param_groups(model: nn.Module, lr: float, adapter_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one at ``lr``, or, with ``adapter_lr_mult != 1``, the ASQ step
    adapters' parameters (``gamma`` included) in a second group at ``lr * adapter_lr_mult``.

    The scheduler scales each group from its own starting rate, so the ratio holds all through training.
    """
    params = list(model.parameters())
    if adapter_lr_mult == 1.0:
        return [{"params": params}]
    in_adapters = {id(p) for m in model.modules() if isinstance(m, StepAdapter) for p in m.parameters()}
    adapter = [p for p in params if id(p) in in_adapters]
    groups = [{"params": [p for p in params if id(p) not in in_adapters]}]
    return groups + ([{"params": adapter, "lr": lr * adapter_lr_mult}] if adapter else [])


def _calibrate(model: nn.Module, config: RunConfig, prep: Prepared, device: torch.device) -> None:
    """Calibrate once on rank 0 from un-augmented training batches, then broadcast to every rank."""
    if distributed.active() and torch.distributed.get_rank() != 0:
        distributed.broadcast_state(model)
        return
    if prep.is_text:  # dict batches: the attention mask reaches the model, and through it the observers
        batches = TextBatches(prep.train, prep.tokenizer, config.batch_size, config.max_length, True, config.seed)  # type: ignore[arg-type]
        calibrate(model, batches, max_batches=config.calib_batches)
    else:
        batches = TensorBatches(prep.train, config.batch_size, prep.normalizer, shuffle=True, seed=config.seed)
        calibrate(model, batches, max_batches=config.calib_batches, forward=lambda m, x: m(x.to(device)))
    distributed.broadcast_state(model)


def _optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config.lr, config.adapter_lr_mult)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def fit(config: RunConfig, out_dir: str | Path, resume: bool = False) -> FitResult:
    """Train as ``config`` says, writing into ``out_dir``; returns the history and the final metrics (or the epoch
    a ``stop_after`` run stopped after)."""
    out = Path(out_dir)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    dist_info = distributed.setup(device)
    device = distributed.rank_device(device, dist_info)
    try:
        return _fit(config, out, resume, device, dist_info)
    finally:
        distributed.teardown()


def _fit(
    config: RunConfig, out: Path, resume: bool, device: torch.device, dist_info: distributed.DistInfo
) -> FitResult:
    ckpt_path = out / "checkpoint.pt"
    prep = prepare(config)
    model = prep.model.to(device)
    start_epoch, history = 0, []
    teacher = None if prep.teacher is None else prep.teacher.to(device)
    resume_payload = None
    if resume:
        resume_payload = load_checkpoint(ckpt_path)
        _check_resumable(resume_payload, config, model)
        model.load_state_dict(resume_payload["state_dict"])
        start_epoch, history = resume_payload["epoch"], list(resume_payload.get("metrics", []))
        _set_rng(resume_payload.get("rng"))
    elif config.quant is not None:
        _calibrate(model, config, prep, device)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    train_batches = _batches(config, prep, dist_info, train=True)
    test_batches = _batches(config, prep, dist_info, train=False)
    trained: nn.Module = model
    if dist_info.enabled:
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = _optimizer(trained, config)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(train_batches))
    scaler = grad_scaler(device, config.amp)
    if resume_payload is not None:
        optimizer.load_state_dict(resume_payload["optimizer"])
        scheduler.load_state_dict(resume_payload["scheduler"])
        if scaler is not None and resume_payload.get("scaler"):
            scaler.load_state_dict(resume_payload["scaler"])
    if config.compile:
        trained = _compiled(trained, model, test_batches, device, out if dist_info.is_main else None)
    last_epoch = config.epochs if config.stop_after is None else min(config.epochs, start_epoch + config.stop_after)
    distill = None
    if teacher is not None:
        settings = config.distill_settings()
        distill = Distillation(teacher, settings["embedding"], settings["hidden_states"], settings["hidden_weight"])
    test: EpochStats | AgreementStats | None = None
    for epoch in range(start_epoch, last_epoch):
        train_batches.epoch = epoch
        step_args = {"amp": config.amp, "scaler": scaler}
        if distill is None:
            stats = train_one_epoch(
                trained, train_batches, optimizer, scheduler, device, epoch, config.progress, **step_args
            )
        else:
            stats = train_one_epoch(
                trained,
                train_batches,
                optimizer,
                scheduler,
                device,
                epoch,
                config.progress,
                forward=distill.student_forward,
                loss_fn=distill.loss,
                **step_args,
            )
        distributed.broadcast_buffers(model)  # every rank evaluates, and rank 0 saves, the same model
        test = _test(model, teacher, test_batches, device, config)
        row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "train_loss": stats.loss, **_test_row(test)}
        if distill is None:
            row = {**row, "train_acc": stats.accuracy, "img_per_s": stats.throughput}
        else:
            row = {**row, "samples_per_s": stats.throughput}
        history.append(row)
        log.info("epoch %d/%d %s", epoch + 1, config.epochs, _fmt(row))
        if dist_info.is_main:
            _save(ckpt_path, model, prep, config, optimizer, scheduler, epoch + 1, history, scaler)
            _write_metrics(out, history)
        distributed.barrier()
    if last_epoch < config.epochs:
        return FitResult(history, stopped_after_epoch=last_epoch)
    if teacher is not None:
        metrics: ImageMetrics | TextMetrics = agreement_metrics(model, teacher, test_batches, device, config, test)  # type: ignore[arg-type]
    else:
        metrics = final_metrics(model, test_batches, device, test)  # type: ignore[arg-type]
    result = FitResult(history, metrics)
    if dist_info.is_main:
        atomic_write_bytes(out / "final.json", json.dumps(result.to_dict(), indent=2).encode())
    return result


def _compiled(
    trained: nn.Module, model: nn.Module, test_batches: Any, device: torch.device, report_dir: Path | None
) -> nn.Module:
    """``trained`` through ``torch.compile``, after counting the graph breaks of ``model`` (and of each quantized
    layer) on two test samples; rank 0 writes them to ``compile.json``."""
    inputs, _ = split_batch(next(iter(test_batches)))
    breaks = graph_breaks(model, to_device(_first_samples(inputs, 2), device))
    log.info("torch.compile: %d graph(s), %d graph break(s)", breaks.graphs, breaks.breaks)
    for reason in breaks.reasons:
        log.warning("graph break: %s", reason)
    if report_dir is not None:
        atomic_write_bytes(report_dir / "compile.json", json.dumps(breaks.to_dict(), indent=2).encode())
    return compile_model(trained)


def _first_samples(inputs: Any, count: int) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[:count]
    if isinstance(inputs, Mapping):  # dicts and tokenizers' BatchEncoding
        return {key: _first_samples(value, count) for key, value in inputs.items()}
    return inputs


def _test(
    model: nn.Module, teacher: nn.Module | None, batches: Any, device: torch.device, config: RunConfig
) -> EpochStats | AgreementStats:
    if teacher is None:
        return evaluate(model, batches, device)  # float32, whatever amp: the numbers `asqpost eval` reports
    return evaluate_agreement(model, teacher, batches, device, config.distill_settings()["embedding"])


def _test_row(test: EpochStats | AgreementStats) -> dict[str, float]:
    if isinstance(test, AgreementStats):
        return {"test_loss": test.loss, "test_cos_mean": test.cos_mean, "test_cos_min": test.cos_min}
    return {"test_loss": test.loss, "test_acc": test.accuracy}


def _rng_state() -> dict[str, Any]:
    """The global random streams (dropout draws from them): saved so a resumed run continues them exactly."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict[str, Any] | None) -> None:
    if state is None:  # checkpoints from before the random state was saved
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_resumable(payload: dict[str, Any], config: RunConfig, model: nn.Module) -> None:
    saved = RunConfig.from_dict(payload["run"])
    same = (
        "model",
        "model_args",
        "data",
        "seed",
        "epochs",
        "batch_size",
        "train_subset",
        "init",
        "adapter_lr_mult",  # decides the optimizer's parameter groups
        "optimizer",
        "loss",
        "distill",
        "max_length",
    )
    diff = [k for k in same if getattr(saved, k) != getattr(config, k)]
    if diff:
        raise CheckpointError(f"cannot resume: the checkpoint was made with different {diff}")
    saved_qat, qat = _parsed_qat(payload["qat"]), _parsed_qat(qat_json(model))
    if saved_qat != qat:  # compared resolved, so `quant` may spell the same config differently
        raise CheckpointError(
            "cannot resume: the checkpoint was made with a different quantization config"
            + _v1_hint(payload["qat"])
            + f"\n  checkpoint: {saved_qat and saved_qat.to_json()}\n  this run:   {qat and qat.to_json()}"
        )


def _v1_hint(saved_qat_json: str | None) -> str:
    if saved_qat_json is None or json.loads(saved_qat_json).get("version") != 1:
        return ""
    return (
        " (it predates config version 2, whose ASQ uses the scale adapter and activations the MSE init: resume "
        "it with --set quant.act.adapter_form=paper --set quant.act.init=lsq)"
    )


def _parsed_qat(text: str | None) -> QATConfig | None:
    """Configs compare parsed: a version-1 config gets the defaults it was made with (``QATConfig.from_dict``)."""
    return None if text is None else QATConfig.from_json(text)


def _save(
    path: Path,
    model: nn.Module,
    prep: Prepared,
    config: RunConfig,
    optimizer,
    scheduler,
    epoch: int,
    history: list[dict[str, Any]],
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    save_checkpoint(
        path,
        {
            "model": prep.spec,
            "qat": qat_json(model),
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "seed": config.seed,
            "run": config.to_dict(),
            "metrics": history,
            "normalizer": None if prep.normalizer is None else prep.normalizer.to_dict(),
            "rng": _rng_state(),
            "scaler": None if scaler is None else scaler.state_dict(),
        },
    )


def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(out / "metrics.csv", buffer.getvalue().encode())
    atomic_write_bytes(out / "metrics.json", json.dumps(history, indent=2).encode())


def _fmt(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "epoch")
