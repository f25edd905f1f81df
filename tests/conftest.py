import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads its mode when it loads, and transformers (tests/test_text.py) loads it on import: without a GPU
    # the Triton kernel tests need the interpreter, so it is chosen here, before any test module imports anything
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
