"""What the ONNX tests need to know about the CPU they run on."""

from __future__ import annotations

import platform
from pathlib import Path


def exact_u8s8() -> bool:
    """Whether ONNX Runtime's uint8 x int8 ``MatMulInteger`` / ``ConvInteger`` sum exactly in int32 here: on x86
    with AVX-512 VNNI, AVX-VNNI or AMX, and off x86. Older x86 CPUs take a ``vpmaddubsw`` path whose int16 pair
    sums saturate when 8-bit activations meet large 8-bit weights (docs/export.md, "CPUs without VNNI")."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
