"""Where and in which precision a run computes: the device names and mixed-precision modes, spelled once.

Device names: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. Mixed precision
(``amp``): ``off``, ``bf16`` or ``fp16`` (what each does in training: :mod:`asqpost.train.accel`).
"""

from __future__ import annotations

import torch

DEVICE_NAMES = "auto (CUDA when present), cpu, cuda or cuda:N"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AMP_MODES = ("off", *AMP_DTYPES)


def check_device_name(name: object) -> str:
    """``name`` if it is one of :data:`DEVICE_NAMES` (whether CUDA is present is checked when it is resolved)."""
    if not isinstance(name, str) or (name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:")):
        raise ValueError(f"device must be {DEVICE_NAMES}, got {name!r}")
    return name


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; ``cuda``/``cuda:N`` without CUDA is an error."""
    if check_device_name(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} requested but CUDA is not available (torch {torch.__version__}, "
            f"built with CUDA: {torch.version.cuda or 'no'}); use device=cpu or device=auto"
        )
    return torch.device(name)


def check_amp(amp: object) -> str:
    """``amp`` if it is one of :data:`AMP_MODES`; ``ValueError`` otherwise."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    return amp  # type: ignore[return-value]
