"""Kernels for packed layers, as backends in one ordered registry (:mod:`asqpost.kernels.backends`), tried in this
order: ``triton`` (CUDA inputs, :mod:`~asqpost.kernels.triton_lut`), ``native`` (the C++ CPU kernel,
:mod:`~asqpost.kernels.native`), ``torch sums`` (torch's exact sums, native rescale), ``reference`` (exact sums
and float64 rescale in torch: the oracle, :mod:`~asqpost.kernels.reference`) and ``float`` (decoded weights, for
layers without an integer form); ``onnx`` (ONNX's standard operators, :mod:`~asqpost.kernels.onnx_graph`) runs
only when selected. Every backend reads a :class:`~asqpost.packed.LayerSpec` and nothing else.
"""

from __future__ import annotations

import torch

from ..rotation import rotate_channels
from . import extension
from .backends import (
    KERNELS,
    Backend,
    Ineligible,
    PlanCache,
    PlanKey,
    current_kernel,
    get_backend,
    list_backends,
    register_backend,
    use_kernel,
)
from .native import NativeBackend, NativePlan, TorchSumsBackend
from .onnx_graph import EmbeddingPlan, OnnxBackend, embedding_rows
from .reference import FloatBackend, ReferenceBackend
from .triton_lut import TritonBackend

_BACKENDS = (TritonBackend(), NativeBackend(), TorchSumsBackend(), ReferenceBackend(), FloatBackend(), OnnxBackend())
for _backend in _BACKENDS:
    register_backend(_backend)


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """:func:`asqpost.rotation.rotate_channels` of a packed layer's input: one native pass for float32 CPU
    tensors where the native backend may run (the same bits), torch's transform elsewhere and inside
    ``torch.compile``."""
    native = x.is_cpu and x.dtype == torch.float32 and current_kernel() in ("auto", "native")
    if native and not torch.compiler.is_compiling() and extension.available() and x.shape[-1] % block == 0:
        return extension.hadamard_rows(x, block)
    return rotate_channels(x, block)


__all__ = [
    "KERNELS",
    "Backend",
    "EmbeddingPlan",
    "Ineligible",
    "NativePlan",
    "PlanCache",
    "PlanKey",
    "current_kernel",
    "embedding_rows",
    "get_backend",
    "list_backends",
    "register_backend",
    "rotate",
    "use_kernel",
]
