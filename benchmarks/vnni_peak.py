"""How close the batched LUT kernel runs to this CPU's VNNI peak, and what that peak allows against int8.

Measures one core's rate of 512-bit ``vpdpbusd`` (12 independent accumulators, a tiny inline extension), then
the native kernel's exact int32 sums for a 4096 x 4096 POST 4-bit layer at batch 64 (weights in cache, 2
threads), and torch's int8 dynamic layer on the same shape. POST keeps two exact sums (even and odd powers of
sqrt 2), so the kernel needs ``2 * M * K * N / 64`` instructions where int8 needs half; the "bound" row is that
count at the measured peak spread over the threads.

Usage: ``python benchmarks/vnni_peak.py [--threads 2]`` (AVX-512 VNNI CPUs only)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn
from torch.utils.cpp_extension import load_inline

from asqpost.kernels import extension, native
from common import machine, table

PEAK_SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <chrono>

__attribute__((target("avx512f,avx512bw,avx512vnni"))) double dpbusd_ns(int64_t rounds) {
  __m512i acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi32(i);
  __m512i x = _mm512_set1_epi8(3), w = _mm512_set1_epi8(5);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < rounds; ++r) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], x, w);
    asm volatile("" : "+v"(x), "+v"(w));
  }
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  int sink = 0;
  for (int i = 0; i < 12; ++i) sink += _mm512_reduce_add_epi32(acc[i]);
  return ns / (12.0 * rounds) + (sink == 42 ? 1e-30 : 0.0);
}
"""


def median_seconds(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if extension.capability() != "avx512_vnni":
        raise SystemExit(f"needs an AVX-512 VNNI CPU (native path here: {extension.capability()})")
    torch.set_num_threads(args.threads)
    peak = load_inline("asqpost_vnni_peak", cpp_sources=PEAK_SOURCE, functions=["dpbusd_ns"], extra_cflags=["-O2"])
    ns_per_op = min(peak.dpbusd_ns(20_000_000) for _ in range(3))

    n = k = 4096
    torch.manual_seed(0)
    weights = native.kernel_weights(torch.randint(0, 15, (n, k)), 7)
    lut_even = torch.tensor([-8, 0, -4, 0, -2, 0, -1, 0, 1, 0, 2, 0, 4, 0, 8, 0], dtype=torch.int8)
    lut_odd = torch.tensor([0, -8, 0, -4, 0, -2, 0, 0, 0, 2, 0, 4, 0, 8, 0, 0], dtype=torch.int8)
    x = torch.randint(0, 16, (args.batch, k), dtype=torch.uint8)
    plan = native.NativePlan(
        weights=weights,
        lut_even=lut_even,
        lut_odd=lut_odd,
        has_odd=True,
        n=n,
        col_scale=torch.ones(n, dtype=torch.float64),
        bias=torch.zeros(0, dtype=torch.float64),
    )
    kernel_s = median_seconds(lambda: native.lut_matmul(x, plan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(k, n)), {nn.Linear}, torch.qint8)
    x_float = torch.rand(args.batch, k)
    int8_s = median_seconds(lambda: int8(x_float))

    instructions = 2 * args.batch * k * n // 64
    bound_s = instructions * ns_per_op * 1e-9 / args.threads
    print(f"machine: {machine()}\n")
    rows = [
        ["one core's 512-bit vpdpbusd", f"{ns_per_op:.3f} ns each"],
        [f"native kernel sums, batch {args.batch} ({instructions / 1e6:.1f}M vpdpbusd)", f"{kernel_s * 1e3:.3f} ms"],
        [
            "those instructions at peak on all threads (bound)",
            f"{bound_s * 1e3:.3f} ms",
            f"kernel at {bound_s / kernel_s:.0%} of peak",
        ],
        ["torch int8 dynamic layer", f"{int8_s * 1e3:.3f} ms", f"bound / int8 = {bound_s / int8_s:.2f}"],
    ]
    print(table(["what", "time", "ratio"], [row + [""] * (3 - len(row)) for row in rows]))


if __name__ == "__main__":
    main()
