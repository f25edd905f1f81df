"""Kernels for packed layers: the float64 reference (the oracle and the fallback), the native CPU kernel and the
Triton kernel for CUDA inputs (:mod:`asqpost.kernels.triton_lut`, ``ASQPOST_KERNEL=triton``).

:func:`packed_forward` picks the path for a layer: the native LUT kernel when it is built and the layer is
eligible (see :mod:`asqpost.kernels.native`); else, for a quantized input and a table with a small-integer
form, the reference's exact sums with the rescale in native code (or all in torch: the reference path);
else the decoded-float path.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from . import native, triton_lut
from .native import NativePlan
from .reference import integer_accumulators, integer_forward_reference

if TYPE_CHECKING:
    from ..export.modules import PackedLayer


def kernel_choice() -> str:
    """``auto`` (default), ``native`` (fail if the extension cannot be built), ``triton`` (fail without triton and
    a CUDA input; auto takes it for CUDA inputs where triton imports) or ``reference``, from ``ASQPOST_KERNEL``.
    Layers a kernel cannot take run the reference path in every mode."""
    choice = os.environ.get("ASQPOST_KERNEL", "auto")
    if choice not in ("auto", "native", "triton", "reference"):
        raise ValueError(f"ASQPOST_KERNEL must be auto, native, triton or reference, got {choice!r}")
    return choice


def packed_forward(layer: PackedLayer, x: torch.Tensor, plan: NativePlan | None = None) -> torch.Tensor:
    """The layer's output on the path :func:`kernel_choice` and the layer allow. ``plan`` runs a variant of the
    layer's native plan (another kernel path, another copy of the weights) where the native kernel runs."""
    weight = layer.weight
    if layer.input_quant is None or weight is None or weight.lut() is None:
        return layer.float_forward(x)
    choice = kernel_choice()
    if choice == "triton" or (choice == "auto" and x.is_cuda and triton_lut.available()):
        y = triton_lut.forward(layer, x, strict=choice == "triton")
        return integer_forward_reference(layer, x) if y is None else y
    if x.dtype != torch.float32 or not x.is_cpu:  # native code rounds y to float32 once, as float32 models do
        choice = "reference"
    own = None
    if choice != "reference":
        if not native.available():
            if choice == "native":
                raise RuntimeError("ASQPOST_KERNEL=native but the native LUT kernel could not be built here")
        else:
            own = native.prepare(layer)
    y = None if own is None else native.forward(layer, x, plan or own)
    if y is not None:
        return y
    if choice != "reference" and native.available():
        return native.forward_torch_sums(layer, x)  # not eligible: torch's exact sums, native rescale
    return integer_forward_reference(layer, x)


__all__ = ["NativePlan", "integer_accumulators", "integer_forward_reference", "kernel_choice", "packed_forward"]
