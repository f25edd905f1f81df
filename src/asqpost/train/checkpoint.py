"""Checkpoints: atomic writes, safe reads (``weights_only=True``: no code runs from a file), a format tag.

A checkpoint is a dict of tensors and plain values:

    format: "asqpost-checkpoint"; version: 1
    model: {"name", "num_classes", "input_shape", "kwargs"}   the architecture, from the registry
    qat: QATConfig JSON or None                               the quantization, None for a float model
    state_dict, optimizer, scheduler                          training state
    epoch: epochs completed; seed; run: the resolved run config; metrics: per-epoch list
    normalizer: {"mean", "std"}; versions: {"asqpost", "torch", "python"}
"""

from __future__ import annotations

import io
import platform
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import QATConfig
from ..convert import CONFIG_ATTR, load_quantized
from ..files import atomic_write_bytes
from ..models import model_from_spec
from ..version import __version__

FORMAT = "asqpost-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "model", "qat", "state_dict", "epoch")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe, or does not match what it is loaded into."""


def versions() -> dict[str, str]:
    return {"asqpost": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically save a checkpoint dict (``format``/``version``/``versions`` are filled in)."""
    payload = {"format": FORMAT, "version": VERSION, "versions": versions(), **payload}
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint payload lacks {missing}")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint; only tensors and plain values load (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # random bytes surface as UnpicklingError, IndexError, KeyError, ... from torch
        raise CheckpointError(_unreadable(path, err)) from None  # no chain: torch's text advises unsafe loading
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an asqpost checkpoint (no format tag {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}; this asqpost reads {VERSION}")
    missing = [k for k in REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}")
    check_finite_state(payload["state_dict"], str(path))
    return payload


def _unreadable(path: Path, err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, without torch's advice to load it unsafely."""
    text = str(err)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (
            f"{path} is not an asqpost checkpoint: it holds objects that are not plain data ({refused[1]}); "
            "refused without loading them, since loading them could run code"
        )
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    reason = detail[1].strip() if detail else text
    if "weights_only" in reason:  # torch's advice, not a reason
        reason = "not a plain-data pickle"
    what = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
    return f"{path} is not an asqpost checkpoint, or it is truncated or corrupt ({what})"


def check_finite_state(state: dict[str, Any], source: str) -> None:
    """Refuse weights, steps or scales that are NaN or inf (a poisoned model)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: state_dict is not a mapping")
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{source}: non-finite values (NaN or inf) in {key!r}; refusing a poisoned model")


def build_from_checkpoint(payload: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint describes (architecture, quantization) and load its weights."""
    spec = payload["model"]
    try:
        model = model_from_spec(spec)
    except ValueError as err:
        raise CheckpointError(f"checkpoint cannot rebuild its model: {err}") from err
    if payload["qat"] is None:
        try:
            model.load_state_dict(payload["state_dict"])
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint weights do not match model {spec['name']}: {err}") from err
        return model
    try:
        return load_quantized(model, {CONFIG_ATTR: payload["qat"], "state_dict": payload["state_dict"]})
    except ValueError as err:
        raise CheckpointError(f"checkpoint does not rebuild: {err}") from err


def qat_json(model: nn.Module) -> str | None:
    config: QATConfig | None = getattr(model, CONFIG_ATTR, None)
    return None if config is None else config.to_json()
