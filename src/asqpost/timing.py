"""Latency measurement shared by the demo and the benchmark scripts: interleaved medians, and the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine_description() -> str:
    """The CPU's model name, core count, torch version with its CPU dispatch, threads and the load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f", load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} threads{load}"
    )


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, lead_in: bool = False
) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so drifting load hits all alike.

    ``lead_in``: each timed call follows one untimed call of the same function, so every path starts with its
    worker threads awake, as inside a model (on a VM, waking idle threads alone can cost a few hundred us).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
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
