"""An asqpost ONNX file in ONNX Runtime, called like the model it came from: :class:`OnnxRuntimeModel`."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..text import MissingExtraError
from .format import ExportError
from .onnx import read_onnx_metadata

# ONNX Runtime's input type names and the torch dtype each is fed as
_INPUT_DTYPES = {
    "tensor(float)": torch.float32,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(bool)": torch.bool,
}


def onnxruntime_module() -> Any:
    """The ``onnxruntime`` package, or a :class:`~asqpost.text.MissingExtraError` naming the extra."""
    try:
        import onnxruntime
    except ImportError as err:
        raise MissingExtraError('running an ONNX file needs onnxruntime: pip install "asq-post[onnx]"') from err
    return onnxruntime


# ONNX Runtime's session entry that multiplies uint8 x int8 exactly on x86 CPUs without VNNI (it re-encodes the
# weights as uint8 where they leave [-64, 63]; kOrtSessionOptionsAvx2PrecisionMode)
EXACT_U8S8_KEY = "session.x64quantprecision"


def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's fast uint8 x int8 products can saturate on this CPU: x86 without AVX-512 VNNI,
    AVX-VNNI or AMX, where its kernels add pairs of products in 16 bits (``vpmaddubsw``): 255 x 127 x 2 exceeds
    32767. Elsewhere (VNNI, AMX, ARM) the sums are exact int32. An x86 CPU whose flags cannot be read (no
    ``/proc/cpuinfo``) counts as saturating: exact sums first."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime CPU session options for an asqpost file: ``threads`` intra-op threads (``None``: its default),
    and exact integer products where :func:`u8s8_saturates` (ONNX Runtime's ``session.x64quantprecision``; an
    8-bit layer would otherwise sum wrongly there)."""
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
    if u8s8_saturates():
        options.add_session_config_entry(EXACT_U8S8_KEY, "1")
    return options


class OnnxRuntimeModel(nn.Module):
    """An ONNX export (:func:`~asqpost.export.to_onnx`) in an ONNX Runtime CPU session: ``model(x)`` or
    ``model(input_ids=..., attention_mask=...)`` with torch tensors, returning torch tensors (one output: the
    tensor; several: a tuple). The file's metadata and checksum are verified on load (:class:`ExportError`).

    ``threads``: ONNX Runtime's intra-op threads (``None``: its default, every core). The session multiplies
    exactly on every CPU (:func:`session_options`). ``meta`` is the file's asqpost metadata (model spec,
    normaliser, input and output names)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        ort = onnxruntime_module()
        options = session_options(threads)
        self.meta, raw = read_onnx_metadata(path)
        try:
            self.session = ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own exception types (Fail, InvalidGraph...)
            raise ExportError(f"ONNX Runtime cannot load {path}: {err}") from err
        self.inputs = {i.name: _INPUT_DTYPES.get(i.type) for i in self.session.get_inputs()}
        self.register_buffer("device_anchor", torch.zeros(0), persistent=False)  # evaluation loops read a device

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        feeds = self._feeds(args, kwargs)
        outputs = self.session.run(None, feeds)
        tensors = tuple(torch.from_numpy(out) for out in outputs)
        return tensors[0] if len(tensors) == 1 else tensors

    def _feeds(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        names = list(self.inputs)
        if len(args) > len(names):
            raise ValueError(f"the ONNX graph takes {len(names)} inputs ({names}), got {len(args)} positional")
        given = {**dict(zip(names, args, strict=False)), **{k: v for k, v in kwargs.items() if v is not None}}
        unknown = sorted(set(given) - set(names))
        missing = [name for name in names if name not in given]
        if unknown or missing:
            raise ValueError(f"the ONNX graph's inputs are {names}; missing {missing}, not in the graph {unknown}")
        feeds = {}
        for name, value in given.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"input {name!r} must be a torch tensor, got {type(value).__name__}")
            dtype = self.inputs[name]
            feeds[name] = (value if dtype is None else value.to(dtype)).detach().cpu().numpy()
        return feeds
