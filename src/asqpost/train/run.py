"""A whole training run: data, model (float or QAT from a float checkpoint), resume, checkpoints, metrics.

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
import dataclasses
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..adapters import StepAdapter
from ..batches import split_batch, to_device
from ..beta_report import DEFAULT_GAINS, BetaReport, beta_report, gained_inputs, require_asq
from ..config import QATConfig
from ..convert import calibrate, prepare_qat
from ..data import ImageSet, Normalizer, TensorBatches, TextBatches, TextSet, load_dataset
from ..devices import resolve_device
from ..export import read_packed
from ..files import atomic_write_bytes
from ..models import model_from_spec, model_spec
from ..runconfig import RunConfig
from ..size import model_size_bytes
from ..text import TEXT_MODELS, is_hf_model_spec, is_text_spec, load_tokenizer, pretrained_encoder, text_model_spec
from . import distributed
from .accel import compile_model, grad_scaler, graph_breaks
from .checkpoint import (
    CheckpointError,
    build_from_checkpoint,
    load_checkpoint,
    qat_json,
    save_checkpoint,
)
from .distill import AgreementStats, Distillation, evaluate_agreement, frozen_teacher
from .engine import EpochStats, evaluate, train_one_epoch
from .results import Accuracy, Agreement, FitResult, ImageMetrics, TextMetrics

log = logging.getLogger(__name__)
SHIFT_SEED = 2504


@dataclass
class Prepared:
    """Everything a run needs, built from its config.

    Text runs have no normalizer and a tokenizer; distillation runs a frozen float ``teacher``.
    """

    model: nn.Module
    spec: dict[str, Any]
    normalizer: Normalizer | None
    train: ImageSet | TextSet
    test: ImageSet | TextSet
    tokenizer: Any = None
    teacher: nn.Module | None = None

    @property
    def is_text(self) -> bool:
        return is_text_spec(self.spec)


def _float_model(config: RunConfig, train: ImageSet | TextSet) -> tuple[nn.Module, dict[str, Any], Normalizer | None]:
    if config.init is None and config.model in TEXT_MODELS:
        if config.pretrained is not None:
            raise ValueError(f"pretrained applies to image models; {config.model!r} loads its own weights")
        spec = text_model_spec(config.model, config.model_args)
        return pretrained_encoder(spec), spec, None
    if config.init is None:
        if isinstance(train, TextSet):
            raise ValueError(f"dataset {config.data!r} is text: train a text model ({', '.join(TEXT_MODELS)})")
        spec = model_spec(config.model, train.num_classes, train.input_shape, config.model_args)
        model = model_from_spec(spec)
        if config.pretrained is not None:
            load_pretrained(model, config.pretrained)
        return model, spec, None
    payload = load_checkpoint(config.init)
    if payload["qat"] is not None:
        raise CheckpointError(f"init checkpoint {config.init} is already quantized; start QAT from a float checkpoint")
    spec = payload["model"]
    if is_text_spec(spec):
        return build_from_checkpoint(payload), spec, None
    if tuple(spec["input_shape"]) != train.input_shape or spec["num_classes"] != train.num_classes:
        raise CheckpointError(
            f"{config.init} was trained on inputs {tuple(spec['input_shape'])} with {spec['num_classes']} classes; "
            f"dataset {config.data!r} has {train.input_shape} and {train.num_classes}"
        )
    norm = payload.get("normalizer")
    return build_from_checkpoint(payload), spec, Normalizer(tuple(norm["mean"]), tuple(norm["std"])) if norm else None


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load float weights from ``path`` into ``model`` strictly: a plain state dict of tensors, or a dict holding
    one under ``state_dict`` or ``model`` (read with ``weights_only=True``, onto the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"pretrained weights {path} do not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable or unsafe file is the same error for the user
        kind = type(err).__name__
        raise CheckpointError(f"pretrained weights {path} are not a readable tensor file ({kind})") from None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"pretrained weights {path} hold no state dict of tensors")
    try:
        model.load_state_dict(data)
    except RuntimeError as err:
        raise CheckpointError(f"pretrained weights {path} do not fit the model: {err}") from None


def prepare(config: RunConfig) -> Prepared:
    """Load data and build the (possibly quantized, not yet calibrated) model, deterministically from the seed."""
    torch.manual_seed(config.seed)  # model init, ASQ adapter init and calibration subsampling
    train = load_dataset(config.data, "train", config.data_root).subset(config.train_subset, seed=config.seed)
    test = load_dataset(config.data, "test", config.data_root).subset(config.test_subset, seed=0)
    model, spec, normalizer = _float_model(config, train)
    text = is_text_spec(spec)
    _check_data_fits(config, train, text)
    if config.loss == "distill" and config.quant is None:
        raise ValueError("loss: distill trains a quantized model against its float self; set quant")
    teacher = frozen_teacher(model) if config.loss == "distill" else None
    qat = config.qat_config()
    if qat is not None:
        model = prepare_qat(model, qat, inplace=True)
    if text:
        return Prepared(model, spec, None, train, test, load_tokenizer(spec), teacher)
    return Prepared(model, spec, normalizer or Normalizer.fit(train), train, test, teacher=teacher)


def _check_data_fits(config: RunConfig, train: ImageSet | TextSet, text_model: bool) -> None:
    if text_model != isinstance(train, TextSet):
        what = "a text model" if text_model else f"model {config.model!r}"
        raise ValueError(f"{what} cannot train on {'image' if text_model else 'text'} dataset {config.data!r}")
    if text_model and config.loss != "distill":
        raise ValueError("text models train by distillation (loss: distill): the text datasets have no targets")
    if text_model and (config.augment != "none" or config.gain_augment):
        raise ValueError("augment and gain_augment apply to images; set augment: none (and no gain_augment) for text")


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
            "normalizer": None
            if prep.normalizer is None
            else {"mean": list(prep.normalizer.mean), "std": list(prep.normalizer.std)},
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


def _eval_batches(input_shape, norm, data, data_root, split, shift, batch_size, source, subset=None) -> TensorBatches:
    """A split's batches, normalised as the model was trained (optionally shifted), after checking its shape."""
    dataset = load_dataset(data, split, data_root).subset(subset, seed=0)
    if isinstance(dataset, TextSet):
        raise ValueError(f"{source} is an image model; {data!r} is a text dataset")
    if tuple(input_shape) != dataset.input_shape:
        raise ValueError(f"{source} expects inputs {tuple(input_shape)}; {data!r} has {dataset.input_shape}")
    normalizer = Normalizer(tuple(norm["mean"]), tuple(norm["std"])) if norm else Normalizer.fit(dataset)
    kind = "gain" if shift is True or not shift else shift  # --shift alone is the gain shift
    return TensorBatches(dataset, batch_size, normalizer, shift_seed=SHIFT_SEED if shift else None, shift_kind=kind)


def _evaluate_model(
    model: nn.Module, input_shape, norm, data, data_root, split, shift, batch_size, source, subset=None
) -> Accuracy:
    batches = _eval_batches(input_shape, norm, data, data_root, split, shift, batch_size, source, subset)
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
    device = next(model.parameters()).device
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
    model, :func:`evaluate_text_model`); ``subset``: a fixed random subset of that many samples."""
    model, meta = read_packed(path)
    model = model.to(resolve_device(device))
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
    batches = _eval_batches(input_shape, norm, data, data_root, split, shift, batch_size, path, subset)
    return beta_report(model, partial(gained_inputs, batches), gains, source=str(path))
