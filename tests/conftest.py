import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads its mode when it loads, and transformers (tests/test_text.py) loads it on import: without a GPU
    # the Triton kernel tests need the interpreter, so it is chosen here, before any test module imports anything
    os.environ.setdefault("TRITON_INTERPRET", "1")

_capability = os.environ.get("ATEN_CPU_CAPABILITY")
if _capability:
    # torch.compile's on-disk cache keys a compiled graph without the vector ISA inductor picked, and inductor picks
    # it from ATEN_CPU_CAPABILITY: a graph cached by a run under one capability fails in its C++ kernels when a run
    # under another loads it (CI reruns the numerics tests under avx2). Each capability keeps its own cache.
    _uid = getattr(os, "getuid", lambda: "")()
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{_uid}_{_capability}")
    )


@pytest.fixture(autouse=True)
def _deterministic():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
