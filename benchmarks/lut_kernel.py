"""Packed-LUT linear layer speed against torch's CPU paths, one 4096 x 4096 layer, weights streamed from memory.

Every path rotates through copies of its weights that together exceed the caches, so each call reads its
weights from DRAM (the situation of a large model at small batch). Paths are interleaved, medians reported;
each timed call follows an untimed call of the same path (on the next copy), so every path runs with its
threads awake, as a layer inside a model does.

* fp32 ``F.linear``; torch int8 dynamic quantization (``quantize_dynamic``, FBGEMM); torch's int4 CPU kernel
  (``_weight_int4pack_mm_for_cpu``, bf16 activations);
* asqpost reference (the ``reference`` kernel selection: float64 exact sums) and native (this package's kernel);
  both run the whole packed layer: u8 activation codes, two accumulators, rescale; the ASQ row adds the
  adapter (GAP -> Linear(C, C/4) -> ReLU -> Linear(C/4, 1) in fp32, which at C = 4096 is 4M MACs);
  the native rows run the native backend with one plan per copy of the weights (``dataclasses.replace``);
* the 4-bit memory floor: summing the same 8 MiB of codes (a pure stream read of what our layer must read), on
  the native path's own copies (same memory), half a rotation away from where that path reads.

Usage: ``python benchmarks/lut_kernel.py [--repeats 30] [--threads 2]``
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.export import convert_to_packed
from asqpost.kernels import extension, get_backend
from common import interleaved_medians, machine, table

STREAM_BYTES = 512 * 2**20  # total size of the rotated copies per path: far beyond any L3


class Rotating:
    """Call ``fn(item)`` on the next of ``items`` each time (starting after ``start``)."""

    def __init__(self, items, fn, start: int = 0):
        self.items, self.fn, self.i = items, fn, start

    def __call__(self):
        self.i = (self.i + 1) % len(self.items)
        return self.fn(self.items[self.i])


def copies(nbytes: int) -> int:
    return max(2, STREAM_BYTES // nbytes)


def build_paths(n: int, k: int, batch: int) -> dict[str, Rotating]:
    torch.manual_seed(0)
    x = torch.relu(torch.randn(batch, k))
    base = nn.Linear(k, n)
    paths: dict[str, Rotating] = {}

    fp32 = [torch.randn(n, k) for _ in range(copies(n * k * 4))]
    paths["fp32 F.linear"] = Rotating(fp32, lambda w: F.linear(x, w))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = [
            torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(k, n)), {nn.Linear}, torch.qint8)
            for _ in range(copies(n * k))
        ]
    paths["torch int8 dynamic"] = Rotating(int8, lambda m: m(x))

    x_bf16 = x.to(torch.bfloat16)
    scales = torch.zeros(k // 128, n, 2, dtype=torch.bfloat16)
    scales[..., 0] = 0.01
    int4 = [
        torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        for _ in range(copies(n * k // 2))
    ]
    paths["torch int4 (bf16 act)"] = Rotating(int4, lambda w: torch._weight_int4pack_mm_for_cpu(x_bf16, w, 128, scales))

    def run(layer, kernel):
        with torch.no_grad():
            return layer(x, kernel=kernel)

    layers = {}
    for recipe in ("post-lsq", "post-asq"):
        q = prepare_qat(nn.Sequential(base), QATConfig.recipe(recipe, 4, first=None, last=None)).eval()
        calibrate(q, [x])
        layers[recipe] = convert_to_packed(q)[0]
    weights = layers["post-lsq"].plans.plan("native").weights  # kernel layout, built once at load
    native = get_backend("native")

    def streams(recipe):  # each path its own copies: a copy another path just read would still be in cache
        plan = layers[recipe].plans.plan("native")
        return [replace(plan, weights=weights.clone()) for _ in range(copies(weights.numel()))]

    def run_native(plan, recipe):  # same codes, another copy in memory: streamed from DRAM
        with torch.no_grad():
            return native.run(plan, x, layers[recipe].input_quant.step_of(x))

    native_plans = streams("post-lsq")
    paths["asqpost native (POST 4-bit, LSQ act)"] = Rotating(native_plans, lambda p: run_native(p, "post-lsq"))
    paths["asqpost native (POST 4-bit, ASQ act)"] = Rotating(streams("post-asq"), lambda p: run_native(p, "post-asq"))
    paths["asqpost reference (float64)"] = Rotating([layers["post-lsq"]], lambda m: run(m, "reference"))
    # the floor reads the native path's own copies (same memory), half a rotation away (long evicted)
    floor_copies = [p.weights.view(torch.int64) for p in native_plans]
    paths["memory floor (read 4-bit codes)"] = Rotating(floor_copies, torch.sum, start=len(floor_copies) // 2)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = extension.capability()
    print(f"{args.n} x {args.k} linear, median of {args.repeats} interleaved runs, native path: {path}")
    print(f"machine: {machine()}\n")
    results = {}
    for batch in args.batches:
        paths = build_paths(args.n, args.k, batch)
        reps = {name: (3 if "reference" in name else args.repeats) for name in paths}
        slow = {k: v for k, v in paths.items() if reps[k] < args.repeats}
        fast = {k: v for k, v in paths.items() if k not in slow}
        medians = interleaved_medians(fast, args.repeats, lead_in=True)
        medians.update(interleaved_medians(slow, 3, warmup=1, lead_in=True))
        results[batch] = medians
    names = list(results[args.batches[0]])
    fp32 = {b: results[b]["fp32 F.linear"] for b in args.batches}
    rows = []
    for name in names:
        row = [name]
        for b in args.batches:
            t = results[b][name]
            row += [f"{t * 1e3:.3f}", f"{fp32[b] / t:.2f}x"]
        rows.append(row)
    header = ["path"] + [h for b in args.batches for h in (f"batch {b} (ms)", f"speed-up vs fp32 (b{b})")]
    print(table(header, rows))
    for b in args.batches:
        ours, floor = results[b]["asqpost native (POST 4-bit, LSQ act)"], results[b]["memory floor (read 4-bit codes)"]
        print(
            f"batch {b}: native / memory floor = {ours / floor:.2f}, "
            f"native / int8 dynamic = {ours / results[b]['torch int8 dynamic']:.2f}"
        )


if __name__ == "__main__":
    main()
