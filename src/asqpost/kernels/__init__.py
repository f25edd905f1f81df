"""Kernels for packed layers: the float64 reference (the oracle and the fallback) and fast paths.

:func:`packed_forward` picks the path for a layer: the integer LUT path when the input is quantized and the
weight table has a small-integer form, otherwise the decoded-float path.
"""

from __future__ import annotations

import torch

from .reference import integer_forward_reference


def packed_forward(layer, x: torch.Tensor) -> torch.Tensor:
    if layer.input_quant is not None and layer.weight is not None and layer.weight.lut() is not None:
        return integer_forward_reference(layer, x)
    return layer.float_forward(x)


__all__ = ["integer_forward_reference", "packed_forward"]
