"""The native CPU extension's packed-layer entry points as ``torch.library`` custom ops (``asqpost::lut_linear``,
``asqpost::lut_conv2d``, ``asqpost::conv_offsets``) with fake implementations, so ``torch.compile`` traces a packed
model through them and an exporter can map them; and the extension's small helpers (paths, threads, embedding
rows, the Hadamard rotation). The extension itself is :mod:`asqpost.cpp`.

Eager calls go to the extension directly (the dispatcher's few microseconds per call show at batch 1); inside
``torch.compile`` the same functions are reached through the ops.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..cpp import available as available  # re-exported: the backends ask here
from ..cpp import extension, module


def capability() -> str:
    """This CPU's fastest kernel path, or ``reference`` without the extension."""
    built = extension()
    return "reference" if built is None else built.capability()


def threads() -> int:
    """The intra-op threads the kernel splits its work over (torch's setting, as ATen reads it; 1 without it)."""
    built = extension()
    return 1 if built is None else built.threads()


def available_paths() -> list[str]:
    """The kernel paths this CPU runs, fastest first (chosen once, in C++; empty without the extension)."""
    built = extension()
    return [] if built is None else built.available_paths()


def embedding_rows(
    codes: torch.Tensor, byte_levels: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor | None:
    """Rows ``(n, R * P)`` of a packed embedding with whole-byte rows: ``byte_levels[codes[ids], :] * scale[ids]``
    (``codes`` uint8 ``(V, R)``, ``byte_levels`` float32 ``(256, P)``, ``scale`` float32 ``(V,)``, ``ids`` int64),
    in one native pass; ``None`` without the extension or when an id lies outside ``[0, V)``."""
    built = extension()
    return None if built is None else built.embedding_rows(codes, byte_levels, scale, ids)


def hadamard_rows(x: torch.Tensor, block: int) -> torch.Tensor | None:
    """:func:`asqpost.rotation.walsh_hadamard` of float32 CPU ``x`` in one native pass (the same bits), or
    ``None`` without the extension."""
    built = extension()
    return None if built is None else built.hadamard_rows(x, block, 1 / math.sqrt(block))


# The plan's fields, in the C++ order (asqpost.kernels.native.NativePlan.kernel_args)
_PLAN = (
    "Tensor weights, Tensor lut_even, Tensor lut_odd, bool has_odd, int n, Tensor col_scale, Tensor bias, str path, "
    "int offset, Tensor correction_even, Tensor correction_odd, bool direct"
)


def _lut_linear_fake(x, step, qmin, qmax, weights, lut_even, lut_odd, has_odd, n, *rest):
    return x.new_empty((*x.shape[:-1], n))


def _lut_conv2d_fake(x, step, qmin, qmax, offsets, weights, lut_even, lut_odd, has_odd, n, *rest):
    return x.new_empty((offsets.shape[0] * offsets.shape[1] * offsets.shape[2], n), dtype=torch.float32)


def _conv_offsets_fake(batch, height, width, padded_channels, kernel_size, stride, padding, dilation):
    sides = zip((height, width), padding, dilation, kernel_size, stride, strict=True)
    size = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in sides]
    return torch.empty((batch, *size, kernel_size[0] * kernel_size[1]), dtype=torch.int64)


def _register_ops() -> torch.library.Library:
    library = torch.library.Library("asqpost", "FRAGMENT")
    library.define(f"lut_linear(Tensor x, Tensor step, int qmin, int qmax, {_PLAN}) -> Tensor")
    library.define(f"lut_conv2d(Tensor x, Tensor step, int qmin, int qmax, Tensor offsets, {_PLAN}) -> Tensor")
    library.define("conv_offsets(int b, int h, int w, int c, int[] kernel, int[] stride, int[] pad, int[] d) -> Tensor")
    library.impl("lut_linear", lambda *args: module().lut_linear_forward(*args), "CPU")
    library.impl("lut_conv2d", lambda *args: module().lut_conv2d_forward(*args), "CPU")
    library.impl("conv_offsets", lambda *args: module().conv_offsets(*args), "CompositeExplicitAutograd")
    for name, fake in (("lut_linear", _lut_linear_fake), ("lut_conv2d", _lut_conv2d_fake)):
        torch.library.register_fake(f"asqpost::{name}", fake, lib=library)
    torch.library.register_fake("asqpost::conv_offsets", _conv_offsets_fake, lib=library)
    return library


# once per process (a module imported again finds them: the dispatcher keeps the first library alive)
_LIBRARY = None if hasattr(torch.ops.asqpost, "lut_linear") else _register_ops()


def lut_linear(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, plan_args: tuple) -> torch.Tensor:
    """``asqpost::lut_linear``: the whole packed linear layer (quantize, LUT accumulate, rescale), ``(..., n)``."""
    if torch.compiler.is_compiling():
        return torch.ops.asqpost.lut_linear(x, step, qmin, qmax, *plan_args)
    return module().lut_linear_forward(x, step, qmin, qmax, *plan_args)


def lut_conv2d(
    x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, offsets: torch.Tensor, plan_args: tuple
) -> torch.Tensor:
    """``asqpost::lut_conv2d``: a packed conv over NHWC float32 ``x``, NHWC rows ``(B * OH * OW, n)``."""
    if torch.compiler.is_compiling():
        return torch.ops.asqpost.lut_conv2d(x, step, qmin, qmax, offsets, *plan_args)
    return module().lut_conv2d_forward(x, step, qmin, qmax, offsets, *plan_args)


def conv_offsets(shape: tuple[int, int, int, int], geometry: Any, padded_channels: int) -> torch.Tensor:
    """``asqpost::conv_offsets`` for an NHWC input of ``shape`` and a :class:`~asqpost.packed.ConvGeometry`."""
    batch, height, width, _ = shape
    args = (batch, height, width, padded_channels, *(list(getattr(geometry, f)) for f in _CONV_FIELDS))
    if torch.compiler.is_compiling():
        return torch.ops.asqpost.conv_offsets(*args)
    return module().conv_offsets(*args)


_CONV_FIELDS = ("kernel_size", "stride", "padding", "dilation")
