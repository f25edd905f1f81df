"""A whole training run: data, model (float or QAT from a float checkpoint), resume, checkpoints, metrics.

``fit(config, out_dir)`` writes into ``out_dir``:

    config.yaml        the resolved run config
    checkpoint.pt      after every epoch, atomically (the resume point)
    metrics.csv/json   one row per epoch
    final.json         clean and shifted test accuracy, model size, when the last epoch is done
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..adapters import StepAdapter
from ..beta_report import DEFAULT_GAINS, BetaReport, beta_report, gained_inputs, require_asq
from ..config import QATConfig
from ..convert import calibrate, prepare_qat
from ..data import ImageSet, Normalizer, TensorBatches, load_dataset
from ..export import read_packed
from ..files import atomic_write_bytes
from ..models import model_from_spec, model_spec
from ..runconfig import RunConfig
from ..size import model_size_bytes
from . import distributed
from .checkpoint import (
    CheckpointError,
    build_from_checkpoint,
    load_checkpoint,
    qat_json,
    save_checkpoint,
)
from .engine import EpochStats, evaluate, train_one_epoch

log = logging.getLogger(__name__)
SHIFT_SEED = 2504


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


@dataclass
class Prepared:
    """Everything a run needs, built from its config."""

    model: nn.Module
    spec: dict[str, Any]
    normalizer: Normalizer
    train: ImageSet
    test: ImageSet


def _float_model(config: RunConfig, train: ImageSet) -> tuple[nn.Module, dict[str, Any], Normalizer | None]:
    if config.init is None:
        spec = model_spec(config.model, train.num_classes, train.input_shape, config.model_args)
        return model_from_spec(spec), spec, None
    payload = load_checkpoint(config.init)
    if payload["qat"] is not None:
        raise CheckpointError(f"init checkpoint {config.init} is already quantized; start QAT from a float checkpoint")
    spec = payload["model"]
    if tuple(spec["input_shape"]) != train.input_shape or spec["num_classes"] != train.num_classes:
        raise CheckpointError(
            f"{config.init} was trained on inputs {tuple(spec['input_shape'])} with {spec['num_classes']} classes; "
            f"dataset {config.data!r} has {train.input_shape} and {train.num_classes}"
        )
    norm = payload.get("normalizer")
    return build_from_checkpoint(payload), spec, Normalizer(tuple(norm["mean"]), tuple(norm["std"])) if norm else None


def prepare(config: RunConfig) -> Prepared:
    """Load data and build the (possibly quantized, not yet calibrated) model, deterministically from the seed."""
    torch.manual_seed(config.seed)  # model init, ASQ adapter init and calibration subsampling
    train = load_dataset(config.data, "train", config.data_root).subset(config.train_subset, seed=config.seed)
    test = load_dataset(config.data, "test", config.data_root).subset(config.test_subset, seed=0)
    model, spec, normalizer = _float_model(config, train)
    qat = config.qat_config()
    if qat is not None:
        model = prepare_qat(model, qat, inplace=True)
    return Prepared(model, spec, normalizer or Normalizer.fit(train), train, test)


def _batches(config: RunConfig, prep: Prepared, dist_info: distributed.DistInfo, train: bool) -> TensorBatches:
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
    batches = TensorBatches(prep.train, config.batch_size, prep.normalizer, shuffle=True, seed=config.seed)
    calibrate(model, batches, max_batches=config.calib_batches, forward=lambda m, x: m(x.to(device)))
    distributed.broadcast_state(model)


def fit(config: RunConfig, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train as ``config`` says, writing into ``out_dir``; returns the final (or latest) metrics."""
    out = Path(out_dir)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    dist_info = distributed.setup(device)
    try:
        return _fit(config, out, resume, device, dist_info)
    finally:
        distributed.teardown()


def _fit(config: RunConfig, out: Path, resume: bool, device: torch.device, dist_info: distributed.DistInfo):
    ckpt_path = out / "checkpoint.pt"
    prep = prepare(config)
    model = prep.model.to(device)
    start_epoch, history = 0, []
    resume_payload = None
    if resume:
        resume_payload = load_checkpoint(ckpt_path)
        _check_resumable(resume_payload, config, model)
        model.load_state_dict(resume_payload["state_dict"])
        start_epoch, history = resume_payload["epoch"], list(resume_payload.get("metrics", []))
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
    optimizer = torch.optim.SGD(
        param_groups(trained, config.lr, config.adapter_lr_mult),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(train_batches))
    if resume_payload is not None:
        optimizer.load_state_dict(resume_payload["optimizer"])
        scheduler.load_state_dict(resume_payload["scheduler"])
    last_epoch = config.epochs if config.stop_after is None else min(config.epochs, start_epoch + config.stop_after)
    test = None
    for epoch in range(start_epoch, last_epoch):
        train_batches.epoch = epoch
        stats = train_one_epoch(trained, train_batches, optimizer, scheduler, device, epoch, config.progress)
        distributed.broadcast_buffers(model)  # every rank evaluates, and rank 0 saves, the same model
        test = evaluate(model, test_batches, device)
        row = {
            "epoch": epoch + 1,
            "lr": scheduler.get_last_lr()[0],
            "train_loss": stats.loss,
            "train_acc": stats.accuracy,
            "test_loss": test.loss,
            "test_acc": test.accuracy,
            "img_per_s": stats.throughput,
        }
        history.append(row)
        log.info("epoch %d/%d %s", epoch + 1, config.epochs, _fmt(row))
        if dist_info.is_main:
            _save(ckpt_path, model, prep, config, optimizer, scheduler, epoch + 1, history)
            _write_metrics(out, history)
        distributed.barrier()
    if last_epoch < config.epochs:
        return {"stopped_after_epoch": last_epoch, "history": history}
    final = {**final_metrics(model, test_batches, device, test), "history": history}
    if dist_info.is_main:
        atomic_write_bytes(out / "final.json", json.dumps(final, indent=2).encode())
    return final


def final_metrics(
    model: nn.Module, test_batches: TensorBatches, device: torch.device, clean: EpochStats | None = None
) -> dict[str, Any]:
    """Clean (``clean`` if the last epoch just measured it), gain-shifted and noise-shifted test accuracy, and the
    model size."""
    clean = clean or evaluate(model, test_batches, device)
    shifted = evaluate(model, dataclasses.replace(test_batches, shift_seed=SHIFT_SEED), device)
    noisy = evaluate(model, dataclasses.replace(test_batches, shift_seed=SHIFT_SEED, shift_kind="noise"), device)
    return {
        "test_acc": clean.accuracy,
        "shift_acc": shifted.accuracy,
        "noise_acc": noisy.accuracy,
        "size_bytes": model_size_bytes(model),
        "float_size_bytes": model_size_bytes(model, as_float=True),
    }


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
            "normalizer": {"mean": list(prep.normalizer.mean), "std": list(prep.normalizer.std)},
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


def _eval_batches(input_shape, norm, data, data_root, split, shift, batch_size, source, subset=None) -> TensorBatches:
    """A split's batches, normalised as the model was trained (optionally shifted), after checking its shape."""
    dataset = load_dataset(data, split, data_root).subset(subset, seed=0)
    if tuple(input_shape) != dataset.input_shape:
        raise ValueError(f"{source} expects inputs {tuple(input_shape)}; {data!r} has {dataset.input_shape}")
    normalizer = Normalizer(tuple(norm["mean"]), tuple(norm["std"])) if norm else Normalizer.fit(dataset)
    kind = "gain" if shift is True or not shift else shift  # --shift alone is the gain shift
    return TensorBatches(dataset, batch_size, normalizer, shift_seed=SHIFT_SEED if shift else None, shift_kind=kind)


def _evaluate_model(model: nn.Module, input_shape, norm, data, data_root, split, shift, batch_size, source):
    batches = _eval_batches(input_shape, norm, data, data_root, split, shift, batch_size, source)
    stats = evaluate(model, batches, next(model.buffers()).device)
    return {"accuracy": stats.accuracy, "loss": stats.loss, "samples": stats.samples, "shift": shift}


def evaluate_export(
    path: str | Path,
    data: str,
    data_root: str | None = None,
    split: str = "test",
    shift: bool | str = False,
    batch_size: int = 500,
    device: str = "auto",
) -> dict[str, Any]:
    """Accuracy of an exported (packed) model, computed from its packed form."""
    model, meta = read_packed(path)
    model = model.to(resolve_device(device))
    return _evaluate_model(
        model, meta["model"]["input_shape"], meta.get("normalizer"), data, data_root, split, shift, batch_size, path
    )


def evaluate_checkpoint(
    path: str | Path,
    data: str,
    data_root: str | None = None,
    split: str = "test",
    shift: bool | str = False,
    batch_size: int = 500,
    device: str = "auto",
) -> dict[str, Any]:
    """Accuracy of a checkpoint on a dataset split (optionally under the per-sample gain/offset shift)."""
    payload = load_checkpoint(path)
    model = build_from_checkpoint(payload).to(resolve_device(device))
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
    )


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
    batches = _eval_batches(input_shape, norm, data, data_root, split, shift, batch_size, path, subset)
    return beta_report(model, partial(gained_inputs, batches), gains, source=str(path))
