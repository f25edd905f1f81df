"""Quantization configs: frozen dataclasses, validated on construction, JSON-able with a format version.

A :class:`QATConfig` says how every ``Conv2d``/``Linear`` of a model is quantized: a default weight and
activation :class:`QuantizerConfig`, the first and last layers' treatment, overrides and exclusions by
module-name pattern (:func:`pattern_matches`), and the embeddings' quantization. ``None`` for a quantizer
means "keep it in float".
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field, fields
from typing import Any

from .adapters import ADAPTER_FORMS, POSITIVE_MAPS
from .levels import check_bits
from .registry import FLOAT, get_method, methods_for
from .rotation import check_rotation_block

CONFIG_VERSION = 2
# Version 1 defaulted ASQ to the paper's adapter and activations to LSQ's init; its dicts
# still load, with those defaults written in (``_upgrade_v1``).
V1_ACT_DEFAULTS = {"adapter_form": "paper", "init": "lsq"}
INITS = ("lsq", "mse", "percentile")
DEFAULT_INIT = {"weight": "mse", "act": "mse"}


def split_recipe(name: str) -> tuple[str, str]:
    """``(weight method, act method)`` of a recipe name: ``post-asq``, ``lsq-lsq``, or ``lsq`` (= ``lsq-lsq``).

    A single name means that method for weights and LSQ for activations. Method names never hold a ``-``
    (the registry refuses them), so the split is unambiguous.
    """
    weight_method, _, act_method = name.partition("-")
    act_method = act_method or "lsq"
    if weight_method not in methods_for("weight") or act_method not in methods_for("act"):
        raise ValueError(
            f"unknown recipe {name!r}: use '<weight>-<act>' with weight in {methods_for('weight')} "
            f"and act in {methods_for('act')}"
        )
    return weight_method, act_method


def recipe_names() -> tuple[str, ...]:
    """Every ``<weight>-<act>`` recipe the registered methods make."""
    return tuple(f"{w}-{a}" for w in methods_for("weight") for a in methods_for("act"))


def _match_parts(parts: list[str], components: list[str]) -> bool:
    if not parts:
        return not components
    if parts[0] == "**":
        return any(_match_parts(parts[1:], components[i:]) for i in range(len(components) + 1))
    return bool(components) and fnmatch.fnmatchcase(components[0], parts[0]) and _match_parts(parts[1:], components[1:])


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether a layer pattern selects the module ``name``: the pattern matches the name or one of its parents.

    Patterns respect dots: ``*``, ``?`` and ``[...]`` match within one dotted component, and a ``**``
    component matches any number of components (zero included). So ``encoder.layer.*.output.dense`` selects
    ``encoder.layer.3.output.dense`` but not ``encoder.layer.3.attention.output.dense``, ``**.dense`` selects
    every layer named ``dense``, and ``layer3.*`` (a parent: the blocks of ``layer3``) selects every layer
    inside them.
    """
    parts, components = pattern.split("."), name.split(".")
    return any(_match_parts(parts, components[:k]) for k in range(1, len(components) + 1))


def _reject_unknown(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; known keys: {sorted(known)}")


@dataclass(frozen=True)
class QuantizerConfig:
    """One quantizer.

    method: a registered quantization method (:mod:`asqpost.registry`): built in, ``lsq`` or ``asq`` for
        activations; ``lsq``, ``uniform``, ``pot``, ``post`` or ``apot`` for weights (the last four are
        level-set grids with a learned per-channel scale).
    bits: 2..8, sign included when signed.
    signed: activations only; ``None`` decides at calibration (signed if any calibration input is negative).
    adapter: ASQ only: the adapter's positive map (``softplus``, ``exp`` or the paper's ``relu``).
    adapter_form: ASQ only: ``scale`` (the default: beta follows the input's mean |x| by construction,
        ``beta = (r(x) / r_ref)^gamma * positive(mlp(m(x) / r(x)))``; see :mod:`asqpost.adapters`) or ``paper``
        (beta from the channel means, as published). docs/results.md, "Does ASQ's step follow the sample?", says why.
    per_token: ASQ on ``(N, T, C)`` inputs: one beta per token instead of per sample.
    init: scale initialisation: ``lsq`` (LSQ's ``2 mean|x| / sqrt(qmax)``; uniform grids only), ``mse``
        (search for the least squared error) or ``percentile`` (99th percentile of |x| on the top level, as
        the public POST code), among those the method implements. ``None``: ``mse`` for weights and
        activations (ahead of LSQ's rule on clean and shifted data in the Fashion-MNIST study), or the method's first
        init if it lacks that one.
    adapter_reduction, adapter_hidden: ASQ only: the adapter's hidden width, ``channels // adapter_reduction``
        (default 4, the paper's) or ``adapter_hidden`` when set (a fixed width, e.g. 8: a far smaller adapter
        on wide layers); :func:`asqpost.size.adapter_parameters` reports what the adapters cost.
    smooth: activations only: SmoothQuant's migration strength ``alpha`` in ``(0, 1]``, or ``None`` (off). At
        calibration the layer gets per-input-channel factors ``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)``;
        it then quantizes ``x / s`` and ``W * s`` (the same product in float), which moves outlier channels'
        range from the activations into the weights (Xiao et al. 2023). Linear and ungrouped conv layers.
    rotate: activations only, Linear layers: the largest block of a Hadamard rotation of the input channels (a
        power of two), or ``None`` (off). The layer quantizes ``x R`` and ``W R`` (the same product in float),
        which spreads outlier channels over the whole block (QuaRot-style); see :mod:`asqpost.rotation`.
    normalise_init: ASQ with the scale adapter only: initialise the step on ``x / r(x)`` (each sample or token
        at its own mean |x|) and multiply by ``r_ref`` (off: on ``x`` itself). The transformer recipe turns
        it on (per-token W4A8 PTQ cosine 0.72 -> 0.89 on MiniLM; per sample about the same).
    """

    method: str
    bits: int
    signed: bool | None = None
    adapter: str = "softplus"
    adapter_form: str = "scale"
    per_token: bool = False
    init: str | None = None
    adapter_reduction: int = 4
    adapter_hidden: int | None = None
    smooth: float | None = None
    rotate: int | None = None
    normalise_init: bool = False

    def __post_init__(self) -> None:
        method = get_method(self.method)
        check_bits(self.bits)
        if self.signed is not None and not isinstance(self.signed, bool):
            raise ValueError(f"signed must be true, false or null, got {self.signed!r}")
        if self.adapter not in POSITIVE_MAPS:
            raise ValueError(f"unknown adapter {self.adapter!r}; choose one of {POSITIVE_MAPS}")
        if self.adapter_form not in ADAPTER_FORMS:
            raise ValueError(f"unknown adapter_form {self.adapter_form!r}; choose one of {ADAPTER_FORMS}")
        if self.init not in (None, *INITS):
            raise ValueError(f"unknown init {self.init!r}; choose one of {INITS}")
        if self.init is not None and self.init not in method.inits:
            raise ValueError(f"init {self.init!r} does not apply to {self.method!r}; it takes {method.inits}")
        if not _is_int(self.adapter_reduction) or self.adapter_reduction < 1:
            raise ValueError(f"adapter_reduction must be an integer >= 1, got {self.adapter_reduction!r}")
        if self.adapter_hidden is not None and (not _is_int(self.adapter_hidden) or self.adapter_hidden < 1):
            raise ValueError(f"adapter_hidden must be an integer >= 1 or null, got {self.adapter_hidden!r}")
        if not isinstance(self.normalise_init, bool):
            raise ValueError(f"normalise_init must be true or false, got {self.normalise_init!r}")
        if self.normalise_init and (self.method != "asq" or self.adapter_form != "scale"):
            raise ValueError("normalise_init applies to ASQ with adapter_form 'scale' only")
        if self.smooth is not None:
            if isinstance(self.smooth, bool) or not isinstance(self.smooth, int | float) or not 0 < self.smooth <= 1:
                raise ValueError(f"smooth (SmoothQuant's alpha) must be in (0, 1] or null, got {self.smooth!r}")
            object.__setattr__(self, "smooth", float(self.smooth))
        if self.rotate is not None:
            check_rotation_block(self.rotate)

    def init_for(self, role: str) -> str:
        """The scale initialisation this quantizer uses in ``role``."""
        inits = get_method(self.method).inits
        return self.init or (DEFAULT_INIT[role] if DEFAULT_INIT[role] in inits else inits[0])

    def check_role(self, role: str) -> None:
        allowed = methods_for(role)
        if self.method not in allowed:
            raise ValueError(f"method {self.method!r} cannot quantize {role}s; choose one of {allowed}")
        if role == "weight" and self.smooth is not None:
            raise ValueError("smooth is an activation setting (act={'smooth': alpha}); a weight quantizer has none")
        if role == "weight" and self.rotate is not None:
            raise ValueError("rotate is an activation setting (act={'rotate': block}); a weight quantizer has none")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | str | None) -> QuantizerConfig | None:
        setting = parse_setting(data, "quantizer config", none_is_float=True)
        if setting is None:
            return None
        if isinstance(setting, int):
            raise ValueError(f"a quantizer config is a mapping or 'float' (bits alone name no method), got {data!r}")
        _reject_unknown(cls, setting, "quantizer")
        return cls(**setting)


@dataclass(frozen=True)
class LayerQuant:
    """The resolved quantizers of one layer (``None`` = float)."""

    weight: QuantizerConfig | None
    act: QuantizerConfig | None

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.act is None


def _upgrade_v1_act(act: Any) -> Any:
    """A version-1 activation quantizer mapping with the defaults it was made with written in."""
    if not isinstance(act, dict) or "method" not in act:
        return act
    act = dict(act)
    if act["method"] == "asq":  # the only method with an adapter
        act.setdefault("adapter_form", V1_ACT_DEFAULTS["adapter_form"])
    known = act["method"] in methods_for("act")
    if act.get("init") is None and known and V1_ACT_DEFAULTS["init"] in get_method(act["method"]).inits:
        act["init"] = V1_ACT_DEFAULTS["init"]
    return act


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


Setting = int | dict[str, Any] | None
"""A parsed "float | bits | mapping" value: ``None`` (float), a bit width, or a mapping of fields."""


def parse_setting(value: Any, what: str, none_is_float: bool = False) -> Setting:
    """The one reading of a "float | bits | mapping" value (quantizer configs, layer overrides, first / last,
    embeddings): ``'float'`` (and ``None`` where ``none_is_float``) -> ``None``; an integer -> that bit width,
    checked to lie in [2, 8]; a mapping -> a copy. Anything else raises ``ValueError`` naming ``what``."""
    if value == FLOAT or (value is None and none_is_float):
        return None
    if _is_int(value):
        return check_bits(value, f"{what} bits")
    if isinstance(value, dict):
        return dict(value)
    allowed = "null, 'float'" if none_is_float else "'float'"
    raise ValueError(f"{what} is {allowed}, an integer bit width or a mapping, got {value!r}")


def _with_bits(q: QuantizerConfig | None, bits: int) -> QuantizerConfig | None:
    return None if q is None else dataclasses.replace(q, bits=bits)


def _apply_part(q: QuantizerConfig | None, value: Any, role: str) -> QuantizerConfig | None:
    """Apply one override value (``'float'``, bits, or a mapping of fields) to a quantizer config."""
    setting = parse_setting(value, f"{role} override")
    if setting is None:
        return None
    if isinstance(setting, int):
        if q is None:
            raise ValueError(f"cannot set {role} bits on a float {role}; give a full mapping with a method")
        return _with_bits(q, setting)
    _reject_unknown(QuantizerConfig, setting, f"{role} override")
    return QuantizerConfig(**setting) if q is None else dataclasses.replace(q, **setting)


def _recipe_part(method: str, bits: int, fields_: dict[str, Any] | None, role: str) -> QuantizerConfig:
    """A recipe's quantizer for ``role``: ``method`` at ``bits``, with ``fields_`` set on top."""
    if fields_ is None:
        return QuantizerConfig(method, bits)
    if not isinstance(fields_, dict):
        raise ValueError(f"recipe {role} settings are a mapping of quantizer fields, got {fields_!r}")
    _reject_unknown(QuantizerConfig, fields_, f"recipe {role}")
    if "method" in fields_:
        raise ValueError(f"the recipe names the {role} method; {role}.method cannot be set next to it")
    return QuantizerConfig(**{"method": method, "bits": bits, **fields_})


def apply_edge(spec: LayerQuant, value: Any) -> LayerQuant:
    """First/last layer policy: bits mean uniform weights (LSQ) and activations at that width."""
    setting = parse_setting(value, "first/last")
    if isinstance(setting, int):
        weight = None if spec.weight is None else dataclasses.replace(spec.weight, method="lsq", bits=setting)
        return LayerQuant(weight, _with_bits(spec.act, setting))
    return apply_override(spec, value)


def apply_override(spec: LayerQuant, value: Any) -> LayerQuant:
    """Apply a layer override: ``'float'``, bits for both, or ``{'weight': ..., 'act': ...}``."""
    setting = parse_setting(value, "layer override")
    if setting is None:
        return LayerQuant(None, None)
    if isinstance(setting, int):
        return LayerQuant(_with_bits(spec.weight, setting), _with_bits(spec.act, setting))
    unknown = sorted(set(setting) - {"weight", "act"})
    if unknown:
        raise ValueError(f"unknown layer override key(s) {unknown}; known keys: ['act', 'weight']")
    weight = _apply_part(spec.weight, setting["weight"], "weight") if "weight" in setting else spec.weight
    act = _apply_part(spec.act, setting["act"], "act") if "act" in setting else spec.act
    return LayerQuant(weight, act)


@dataclass(frozen=True)
class QATConfig:
    """How a whole model is quantized.

    weight, act: the default quantizers (``None`` = float).
    first, last: the treatment of the first and last layers: bits (default 8; the weights use LSQ's uniform
        grid there, since a non-uniform grid buys nothing at 8 bits), ``'float'``, a mapping as in
        :func:`apply_override`, or ``None`` to treat them like the rest. Which layers these are is the layer
        plan's (:func:`asqpost.convert.plan_layers`): "first" is every layer that reads the model's input
        before any other quantized layer (all consumers of the embeddings: Q, K and V of an encoder's first
        block), "last" every layer with no quantized layer after it on the way to the output.
    overrides: ``(pattern, value)`` pairs applied in order after first/last; ``pattern`` selects modules by
        name (:func:`pattern_matches`: dot-respecting) and must match at least one layer; ``value`` as in
        :func:`apply_override`.
    exclude: patterns of layers (and embeddings) that stay float and untouched; they do not count when the
        first and last layers are chosen. Each must match something.
    embeddings: the ``nn.Embedding`` tables (word, position ...): ``None`` (default: float), bits (LSQ's
        uniform grid with one step per row, i.e. per token vector), or a weight quantizer mapping (e.g.
        ``{"method": "post", "bits": 4}``: that grid per row).
    share_inputs: layers that read the very same input tensor (Q, K and V) share one activation quantizer:
        one step, one ASQ adapter, one set of codes. Off: each quantizes its input on its own.
    """

    weight: QuantizerConfig | None
    act: QuantizerConfig | None
    first: int | str | None = 8
    last: int | str | None = 8
    overrides: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    embeddings: int | dict[str, Any] | None = None
    share_inputs: bool = True
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is not supported (this asqpost reads {CONFIG_VERSION})")
        if self.weight is not None:
            self.weight.check_role("weight")
        if self.act is not None:
            self.act.check_role("act")
        base = self.default_layer()
        for edge in (self.first, self.last):
            if edge is not None:
                apply_edge(base, edge)
        object.__setattr__(self, "overrides", tuple((str(p), v) for p, v in self.overrides))
        for _, value in self.overrides:
            resolved = apply_override(base, value)
            for role in ("weight", "act"):
                q = getattr(resolved, role)
                if q is not None:
                    q.check_role(role)
        if not isinstance(self.exclude, list | tuple) or not all(isinstance(p, str) for p in self.exclude):
            raise ValueError(f"exclude is a list of layer name patterns, got {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not isinstance(self.share_inputs, bool):
            raise ValueError(f"share_inputs must be true or false, got {self.share_inputs!r}")
        self.embedding_quant()

    def default_layer(self) -> LayerQuant:
        return LayerQuant(self.weight, self.act)

    def embedding_quant(self) -> QuantizerConfig | None:
        """The embeddings' quantizer (one scale per row), or ``None`` when they stay float."""
        setting = parse_setting(self.embeddings, "embeddings", none_is_float=True)
        if setting is None:
            return None
        if isinstance(setting, int):
            return QuantizerConfig("lsq", setting)
        _reject_unknown(QuantizerConfig, setting, "embeddings")
        if "method" not in setting or "bits" not in setting:
            raise ValueError(f"an embeddings mapping needs 'method' and 'bits', got {setting!r}")
        q = QuantizerConfig(**setting)
        q.check_role("weight")
        return q

    @classmethod
    def recipe(
        cls,
        name: str,
        bits: int,
        act_bits: int | None = None,
        *,
        weight: dict[str, Any] | None = None,
        act: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> QATConfig:
        """A config from a ``<weight method>-<activation method>`` name (:func:`split_recipe`).

        ``bits``: the weights' width, and the activations' unless ``act_bits`` is given (W4A8:
        ``recipe("post-asq", 4, act_bits=8)``). ``weight`` / ``act``: :class:`QuantizerConfig` fields for the
        recipe's weight / activation quantizer (not ``method``: the recipe names it), e.g.
        ``act={"per_token": True, "init": "mse", "smooth": 0.5}``. Other keyword arguments (``first``,
        ``last``, ``overrides``, ``exclude``, ``embeddings``, ``share_inputs``) go to the constructor.
        """
        quantizer_fields = sorted(set(kwargs) & {f.name for f in fields(QuantizerConfig)})
        if quantizer_fields:
            raise ValueError(
                f"{quantizer_fields} are quantizer fields: pass them as act={{...}} or weight={{...}}, "
                f"e.g. act={{{quantizer_fields[0]!r}: ...}}"
            )
        weight_method, act_method = split_recipe(name)
        act_bits = bits if act_bits is None else act_bits
        return cls(
            _recipe_part(weight_method, bits, weight, "weight"),
            _recipe_part(act_method, act_bits, act, "act"),
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "weight": self.weight.to_dict() if self.weight else FLOAT,
            "act": self.act.to_dict() if self.act else FLOAT,
            "first": self.first,
            "last": self.last,
            "overrides": [[p, v] for p, v in self.overrides],
            "exclude": list(self.exclude),
            "embeddings": self.embeddings,
            "share_inputs": self.share_inputs,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QATConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a QAT config is a mapping, got {type(data).__name__}")
        _reject_unknown(cls, data, "QAT config")
        if "weight" not in data or "act" not in data:
            raise ValueError("a QAT config needs 'weight' and 'act' (a quantizer mapping or 'float')")
        overrides = data.get("overrides", ())
        if not isinstance(overrides, list | tuple) or any(
            not isinstance(o, list | tuple) or len(o) != 2 for o in overrides
        ):
            raise ValueError(f"overrides must be a list of [pattern, value] pairs, got {overrides!r}")
        if data.get("version") == 1:
            data = {**data, "act": _upgrade_v1_act(data["act"]), "version": CONFIG_VERSION}
        return cls(
            weight=QuantizerConfig.from_dict(data["weight"]),
            act=QuantizerConfig.from_dict(data["act"]),
            first=data.get("first", 8),
            last=data.get("last", 8),
            overrides=tuple((p, v) for p, v in overrides),
            exclude=data.get("exclude", ()),
            embeddings=data.get("embeddings"),
            share_inputs=data.get("share_inputs", True),
            version=data.get("version", CONFIG_VERSION),
        )

    @classmethod
    def from_json(cls, text: str) -> QATConfig:
        return cls.from_dict(json.loads(text))
