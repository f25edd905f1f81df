"""What a run trains on: its data, and its model (float, from a checkpoint or pretrained weights, then prepared
for QAT), built deterministically from the run config (:func:`prepare`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..convert import prepare_qat
from ..data import ImageSet, Normalizer, TextSet, load_dataset
from ..models import model_from_spec, model_spec
from ..runconfig import RunConfig
from ..text import TEXT_MODELS, is_text_spec, load_tokenizer, pretrained_encoder, text_model_spec
from .checkpoint import (
    CheckpointError,
    build_from_checkpoint,
    load_checkpoint,
)
from .distill import frozen_teacher


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
    return build_from_checkpoint(payload), spec, Normalizer.from_dict(norm) if norm else None


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
