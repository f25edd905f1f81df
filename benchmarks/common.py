"""Helpers shared by the benchmark scripts: machine description, interleaved timing, markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}"
    )


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, lead_in: bool = False
) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so drifting load hits all alike.

    ``lead_in``: each timed call follows one untimed call of the same function, so every path starts with its
    worker threads awake, as inside a model (on a VM, waking idle threads alone can cost a few hundred us).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if lead_in:
                fn()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
