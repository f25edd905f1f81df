"""The package's C++ extension (``csrc/asqpost.cpp``: the packed LUT kernels and the fused fake-quant op), built on
first use with torch's C++ extension tooling into the per-user torch extensions cache (so pip's isolated build
never has to fetch its own torch). Where it cannot be built (no compiler, no ninja) everything runs in torch and
one log line says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_STATE: dict[str, Any] = {}
SOURCE = Path(__file__).with_name("csrc") / "asqpost.cpp"


def extension() -> Any | None:
    """The compiled extension module, or ``None`` (logged once) when it cannot be built here."""
    if "module" not in _STATE:
        module = None
        try:
            from torch.utils.cpp_extension import load

            module = load(
                name="asqpost_lut_kernel",
                sources=[str(SOURCE)],
                # OpenMP: ATen's parallel_for is serial without it; no FMA contraction: the rescale must round
                # each float64 operation as the reference does
                extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
            log.info("asqpost native LUT kernel: %s path", module.capability())
        except Exception as err:  # any build failure means: torch runs everything
            log.warning("asqpost native LUT kernel unavailable (%s); using the pure-torch reference path", err)
        _STATE["module"] = module
    return _STATE["module"]


def available() -> bool:
    return extension() is not None


def module() -> Any:
    """The extension, or a ``RuntimeError`` where it cannot be built."""
    built = extension()
    if built is None:
        raise RuntimeError("the native LUT kernel is not available")
    return built
