"""Kernels for packed layers: the float64 reference (the oracle and the fallback), the native CPU kernel and the
Triton kernel for CUDA inputs (:mod:`asqpost.kernels.triton_lut`, ``ASQPOST_KERNEL=triton``).

:func:`packed_forward` picks the path for a layer: the native LUT kernel when it is built and the layer is
eligible (see :mod:`asqpost.kernels.native`); else, for a quantized input and a table with a small-integer
form, the reference's exact sums with the rescale in native code (or all in torch: the reference path);
else the decoded-float path. :func:`layer_path` says which, and why, without running the layer.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from ..rotation import use_one_pass
from . import native, triton_lut
from .native import NativePlan
from .reference import integer_accumulators, integer_forward_reference

use_one_pass(native.hadamard_rows)  # rotated inputs (act.rotate) in one native pass, the same bits

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


NATIVE = "native"  # layer_path's kinds of path: the native LUT kernel (path "native <cpu path>") ...
TORCH_SUMS = "torch sums"  # ... torch's exact sums with the native rescale
REFERENCE = "reference"  # ... the float64 reference in torch
FLOAT = "float"  # ... decoded float weights (no integer form, or a float input)


def layer_path(layer: PackedLayer) -> tuple[str, str]:
    """``(path, reason)``: the path :func:`packed_forward` takes for a float32 CPU input of ``layer``.

    ``path`` is ``native <cpu path>`` (``avx512_vnni``, ``avx2``, ``scalar``), ``torch sums``, ``reference`` or
    ``float``; ``reason`` says why in a few words. At run time an input of another dtype or on another device
    takes the reference path, and a conv input holding NaN or inf does so for that call.
    """
    weight, inp = layer.weight, layer.input_quant
    if inp is None:
        return FLOAT, "input not quantized"
    if weight is None:
        return FLOAT, "float weight"
    if weight.lut() is None:
        return FLOAT, "level table has no small-integer form"
    choice = kernel_choice()
    if choice == "reference":
        return REFERENCE, "ASQPOST_KERNEL=reference"
    if not native.available():
        return REFERENCE, "native kernel not built here"
    if weight.codes.device.type != "cpu":
        return REFERENCE, f"on {weight.codes.device.type}: native code runs on CPU"
    reason = native.ineligible_reason(layer)
    if reason:
        return TORCH_SUMS, reason
    plan = native.prepare(layer)
    path = native.kernel_path(plan)
    if path != native.capability():
        return f"{NATIVE} {path}", f"{native.capability()} is not exact for this table"
    signed = "signed input, offset codes" if plan.offset else "unsigned input"
    return f"{NATIVE} {path}", signed


def packed_forward(layer: PackedLayer, x: torch.Tensor, plan: NativePlan | None = None) -> torch.Tensor:
    """The layer's output on the path :func:`kernel_choice` and the layer allow. ``plan`` runs a variant of the
    layer's native plan (another kernel path, another copy of the weights) where the native kernel runs."""
    weight = layer.weight
    choice = kernel_choice()
    held = None if weight is None else weight.native_state
    own = None if held is None or plan is not None else held.plan  # the layer's native plan, built before
    if own is not None and choice in ("auto", "native") and x.is_cpu and x.dtype == torch.float32:
        y = native.forward(layer, x, own)  # straight to it: at batch 1 every Python step shows
        if y is not None:
            return y
    if layer.input_quant is None or weight is None or weight.lut() is None:
        return layer.float_forward(x)
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


__all__ = [
    "FLOAT",
    "NATIVE",
    "REFERENCE",
    "TORCH_SUMS",
    "NativePlan",
    "integer_accumulators",
    "integer_forward_reference",
    "kernel_choice",
    "layer_path",
    "packed_forward",
]
