"""Where a packed MiniLM layer's time goes at batch 1 (1 x 32 tokens, one thread): the native call against the
Python around it, the direct-int8 8-bit layer against torch's exact sums and FBGEMM, the 4-bit embedding lookup.

all-MiniLM-L6-v2 at W4A8 with LSQ (first/last Linear at 8 bits by the default plan, embeddings at 4 bits),
calibrated as ``transformer_latency.py`` does. Rows, each a median of interleaved repeats (microseconds):

* layer 2's query (384 -> 384, 4-bit codes): the packed module call, the extension call alone (quantize,
  LUT sums, rescale), and torch's int8 dynamic Linear;
* layer 5's output dense (1536 -> 384, 8-bit codes: direct int8 weights): the packed call, the same layer on
  the torch-sums path (``forward_torch_sums``, exact float32 runs), and torch's int8 dynamic Linear;
* the word-embedding lookup: packed 4-bit against the float ``nn.Embedding``.

Usage: ``HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/packed_overheads.py [--repeats 2000]``
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from asqpost.export import convert_to_packed
from asqpost.kernels import NativePlan, extension, get_backend
from common import machine, table
from transformer_latency import load_minilm, quantized, sentences


def medians_us(fns: dict[str, Callable[[], object]], repeats: int, chunk: int = 50) -> dict[str, float]:
    """Median over ``repeats / chunk`` interleaved rounds of each function's mean time per call in a round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(max(1, repeats // chunk)):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(chunk):
                fn()
            times[name].append((time.perf_counter() - start) / chunk * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    texts = sentences(64)
    calib = [dict(tokenizer(texts[i : i + 16], padding=True, return_tensors="pt")) for i in range(0, 64, 16)]
    packed = convert_to_packed(quantized(model, "lsq-lsq", 4, 8, {}, calib, 4))
    int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, torch.qint8)
    query, query8 = packed.encoder.layer[2].attention.self.query, int8.encoder.layer[2].attention.self.query
    last, last8 = packed.encoder.layer[5].output.dense, int8.encoder.layer[5].output.dense
    x, wide = torch.randn(1, 32, 384), torch.randn(1, 32, 1536)
    ids = torch.randint(1000, 20000, (1, 32))
    float_words = model.embeddings.word_embeddings
    with torch.no_grad():
        query(x), last(wide)  # build the native plans
        rows, inp = x.reshape(-1, 384), query.input_quant
        plan, last_plan = query.plans.plan("native"), last.plans.plan("native")
        assert isinstance(plan, NativePlan) and isinstance(last_plan, NativePlan) and last_plan.direct
        ext, sums = extension.extension(), get_backend("torch sums")
        sums_plan, args = last.plans.plan(sums), plan.kernel_args()
        fns = {
            "query: packed module call": lambda: query(x),
            "query: extension call alone": lambda: ext.lut_linear_forward(rows, inp.step, inp.qmin, inp.qmax, *args),
            "query: torch int8 dynamic": lambda: query8(x),
            "output dense 8-bit: packed (direct int8)": lambda: last(wide),
            "output dense 8-bit: torch sums path": lambda: sums.run(sums_plan, wide, last.input_quant.step_of(wide)),
            "output dense 8-bit: torch int8 dynamic": lambda: last8(wide),
            "word embeddings: packed 4-bit lookup": lambda: packed.embeddings.word_embeddings(ids),
            "word embeddings: float lookup": lambda: float_words(ids),
        }
        medians = medians_us(fns, args.repeats)
    print(f"all-MiniLM-L6-v2 LSQ W4A8, 1 x 32 tokens, one thread; machine: {machine()}\n")
    print(table(["what", "us per call"], [[name, f"{t:.1f}"] for name, t in medians.items()]))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
