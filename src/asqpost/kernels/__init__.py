"""Kernels for packed layers: the float64 reference (the oracle and the fallback) and the native CPU kernel.

:func:`packed_forward` picks the path for a layer: the native LUT kernel when it is built and the layer is
eligible (see :mod:`asqpost.kernels.native`), else the reference integer path when the input is quantized
and the table has a small-integer form, else the decoded-float path.
"""

from __future__ import annotations

import os

import torch

from . import native
from .reference import SQRT1_2, combine, integer_accumulators, integer_forward_reference


def kernel_choice() -> str:
    """``auto`` (default), ``native`` or ``reference``, from ``ASQPOST_KERNEL``."""
    choice = os.environ.get("ASQPOST_KERNEL", "auto")
    if choice not in ("auto", "native", "reference"):
        raise ValueError(f"ASQPOST_KERNEL must be auto, native or reference, got {choice!r}")
    return choice


def packed_forward(layer, x: torch.Tensor) -> torch.Tensor:
    if layer.input_quant is None or layer.weight is None or layer.weight.lut() is None:
        return layer.float_forward(x)
    choice = kernel_choice()
    plan = None
    if choice != "reference" and x.device.type == "cpu" and native.available():
        plan = native.prepare(layer)
    if plan is None:
        if choice == "native":
            raise RuntimeError(f"ASQPOST_KERNEL=native but this layer cannot use it ({native.capability()})")
        return integer_forward_reference(layer, x)
    if layer.kind == "linear":
        return native.linear_forward(layer, x, plan)
    x_int, step = layer.input_quant(x)
    acc_even, acc_odd = native.integer_accumulators_native(layer, x_int, plan)
    acc = acc_even.double() if acc_odd is None else acc_even.double() + acc_odd.double() * SQRT1_2
    return combine(layer, acc, step, layer.weight.lut().unit).to(x.dtype)


__all__ = ["integer_accumulators", "integer_forward_reference", "kernel_choice", "packed_forward"]
