"""Kernels for packed layers: the float64 reference (the oracle and the fallback) and the native CPU kernel.

:func:`packed_forward` picks the path for a layer: the native LUT kernel when it is built and the layer is
eligible (see :mod:`asqpost.kernels.native`); else, for a quantized input and a table with a small-integer
form, the reference's exact sums with the rescale in native code (or all in torch: the reference path);
else the decoded-float path.
"""

from __future__ import annotations

import os

import torch

from . import native
from .reference import integer_accumulators, integer_forward_reference


def kernel_choice() -> str:
    """``auto`` (default), ``native`` (fail if the extension cannot be built) or ``reference``, from
    ``ASQPOST_KERNEL``. Layers the native kernel cannot take run the reference path in every mode."""
    choice = os.environ.get("ASQPOST_KERNEL", "auto")
    if choice not in ("auto", "native", "reference"):
        raise ValueError(f"ASQPOST_KERNEL must be auto, native or reference, got {choice!r}")
    return choice


def packed_forward(layer, x: torch.Tensor) -> torch.Tensor:
    weight = layer.weight
    if layer.input_quant is None or weight is None or weight.lut() is None:
        return layer.float_forward(x)
    choice = kernel_choice()
    if x.dtype != torch.float32 or not x.is_cpu:  # native code rounds y to float32 once, as float32 models do
        choice = "reference"
    plan = None
    if choice != "reference":
        if not native.available():
            if choice == "native":
                raise RuntimeError("ASQPOST_KERNEL=native but the native LUT kernel could not be built here")
        else:
            plan = weight._cache["native"] if "native" in weight._cache else native.prepare(layer)
    y = None if plan is None else native.forward(layer, x, plan)
    if y is not None:
        return y
    if choice != "reference" and native.available():
        return native.forward_torch_sums(layer, x)  # not eligible: torch's exact sums, native rescale
    return integer_forward_reference(layer, x)


__all__ = ["integer_accumulators", "integer_forward_reference", "kernel_choice", "packed_forward"]
