"""The run config of ``asqpost train``: a frozen dataclass read from YAML, overridden by ``--set key=value``.

Unknown keys and wrong types are errors that name the key. The resolved config is saved next to the run
(``config.yaml``) and inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .config import QATConfig
from .data import AUGMENTS, check_gain_augment
from .devices import check_amp, check_device_name

# what a recipe's quant may add to its bits: QATConfig.recipe's own arguments (act_bits; act / weight: quantizer
# fields on top of the recipe's methods) and every QATConfig policy field it passes on
RECIPE_SETTINGS = (
    "act_bits",
    *(f.name for f in fields(QATConfig) if f.name not in ("weight", "act", "version")),
    "act",
    "weight",
)
RECIPE_KEYS = ("recipe", "bits", *RECIPE_SETTINGS)
LOSSES = ("ce", "distill")
OPTIMIZERS = ("sgd", "adamw")
DISTILL_DEFAULTS: dict[str, Any] = {"embedding": "cosine", "hidden_states": False, "hidden_weight": 1.0}
DISTILL_EMBEDDING_LOSSES = ("cosine", "mse")


@dataclass(frozen=True)
class RunConfig:
    """One training run (float, or QAT when ``quant`` is set).

    quant: ``{"recipe": "post-asq", "bits": 4}`` (plus optional ``act_bits``, ``first``, ``last``, ``overrides``,
        ``exclude``, ``embeddings``, ``share_inputs``, and ``act`` /
        ``weight``: quantizer fields for the recipe's activation / weight quantizer, e.g. ``{"init": "mse",
        "adapter_form": "scale"}``), or a full QAT config mapping (``weight``, ``act``, ...); ``None`` trains
        in float.
    init: a float checkpoint to start from (its architecture and input normalisation are used).
    train_subset / test_subset: use a fixed random subset of that many samples (``None``: all).
    stop_after: stop this invocation after that many epochs (continue later with ``--resume``).
    adapter_lr_mult: the ASQ step adapters' learning rate (``gamma`` included) is ``lr * adapter_lr_mult``.
    gain_augment: train-time gain augmentation: each training sample times a random gain, log-uniform in
        ``[1/g, g]`` for ``g = gain_augment`` (on the [0, 1] images, as ``eval --shift``); ``None`` or 0: off.
    loss: ``ce`` (cross-entropy on the data's labels) or ``distill``: the quantized model learns to reproduce its
        own float version (the teacher: the model before ``prepare_qat``, frozen), on inputs alone.
    distill: with ``loss: distill``: ``embedding`` (``cosine``: 1 - cosine, or ``mse``, between student and teacher
        outputs), ``hidden_states`` (also match every layer's hidden states, a relative MSE over real tokens;
        text models), ``hidden_weight`` (that term's weight).
    optimizer: ``sgd`` (with ``momentum``) or ``adamw``; both take ``weight_decay``.
    max_length: text data: texts are truncated to this many tokens.
    pretrained: a file of float weights for ``model`` (a plain state dict, e.g. torchvision's ``resnet18``
        ``.pth``, or a dict holding one under ``state_dict`` / ``model``), loaded strictly before QAT; the input
        normalisation is then fitted on the data (ImageNet recipes: use ``init`` for an asqpost checkpoint).
    device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; under ``torchrun`` each rank takes
        ``cuda:LOCAL_RANK``.
    amp: mixed precision of the training steps: ``bf16``, ``fp16`` (with a gradient scaler) or ``off``; fake
        quantization and the ASQ adapter stay in float32 (:mod:`asqpost.train.accel`); evaluation runs in float32.
    compile: train through ``torch.compile`` (graph breaks reported in ``compile.json``).
    """

    model: str = "resnet20"
    model_args: dict = field(default_factory=dict)
    data: str = "fashion-mnist"
    data_root: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    epochs: int = 1
    batch_size: int = 128
    eval_batch_size: int = 500
    lr: float = 0.01
    adapter_lr_mult: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: str = "crop"
    gain_augment: float | None = None
    seed: int = 0
    quant: dict | None = None
    init: str | None = None
    calib_batches: int = 4
    device: str = "auto"
    amp: str = "off"
    compile: bool = False
    pretrained: str | None = None
    threads: int | None = None
    stop_after: int | None = None
    progress: bool = True
    loss: str = "ce"
    distill: dict = field(default_factory=dict)
    optimizer: str = "sgd"
    max_length: int = 128

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("epochs", "batch_size", "eval_batch_size", "calib_batches", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "adapter_lr_mult"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"unknown augment {self.augment!r}; choose one of {AUGMENTS}")
        check_gain_augment(self.gain_augment)
        check_device_name(self.device)
        check_amp(self.amp)
        if self.pretrained is not None and self.init is not None:
            raise ValueError("set init (an asqpost float checkpoint) or pretrained (a state dict file), not both")
        if self.quant is not None:
            self.qat_config()
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        self.distill_settings()

    def distill_settings(self) -> dict[str, Any]:
        """``distill`` over :data:`DISTILL_DEFAULTS`, validated (its keys are errors without ``loss: distill``)."""
        unknown = sorted(set(self.distill) - set(DISTILL_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown distill key(s) {unknown}; known: {list(DISTILL_DEFAULTS)}")
        if self.distill and self.loss != "distill":
            raise ValueError(f"distill settings {sorted(self.distill)} need loss: distill (loss is {self.loss!r})")
        settings = {**DISTILL_DEFAULTS, **self.distill}
        _check_choice("distill.embedding", settings["embedding"], DISTILL_EMBEDDING_LOSSES)
        if not isinstance(settings["hidden_states"], bool):
            raise ValueError(f"distill.hidden_states must be true or false, got {settings['hidden_states']!r}")
        weight = settings["hidden_weight"]
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ValueError(f"distill.hidden_weight must be a number >= 0, got {weight!r}")
        return settings

    def qat_config(self) -> QATConfig | None:
        """The :class:`QATConfig` that ``quant`` describes (validated), or ``None`` for float."""
        if self.quant is None:
            return None
        quant = dict(self.quant)
        if "recipe" in quant:
            unknown = sorted(set(quant) - set(RECIPE_KEYS))
            if unknown:
                raise ValueError(f"unknown quant key(s) {unknown}; with 'recipe' use {', '.join(RECIPE_KEYS[1:])}")
            if "bits" not in quant:
                raise ValueError("quant.recipe needs quant.bits")
            overrides = tuple(tuple(o) for o in quant.pop("overrides", ()))
            return QATConfig.recipe(quant.pop("recipe"), quant.pop("bits"), overrides=overrides, **quant)
        return QATConfig.from_dict(quant)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a run config is a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _accepts(hint: Any, value: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(hint) or hint)


def _check_types(config: RunConfig) -> None:
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        if not _accepts(hints[f.name], value):
            raise ValueError(f"config key {f.name!r} must be {hints[f.name]}, got {value!r}")
        if value is not None and (hints[f.name] == float | None or hints[f.name] is float):
            object.__setattr__(config, f.name, float(value))


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["a=1", "quant.bits=2"]`` -> nested dict; values parsed as YAML (``null``, numbers, lists...)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``changes`` into a copy of ``base`` (a ``None``/missing base mapping is replaced)."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_run_config(path: str | Path | None, sets: list[str] | None = None, **defaults: Any) -> RunConfig:
    """Defaults, then the YAML file, then ``--set`` overrides."""
    data: dict[str, Any] = dict(defaults)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of config keys")
        data = merge(data, loaded)
    data = merge(data, parse_set(sets or []))
    return RunConfig.from_dict(data)
