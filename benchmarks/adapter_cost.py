"""The ASQ step adapter's share of a packed layer's time, on all-MiniLM-L6-v2's shapes.

For each input shape ``(N, T, C)`` ((1, 32, 384) and (8, 128, 384) into a 384 -> 384 layer, (8, 128, 1536) into
MiniLM's 1536 -> 384 output layer) and each ASQ mode (per sample, per sample under a token mask as a
padded transformer batch sets it, per token; the scale-following adapter, W4A8 POST+ASQ), times the whole
packed layer, the same layer with LSQ activations (no adapter), its adapter (``beta``) and the adapter's two
main parts: the statistics (channel means and ``r(x)``) and the hidden
``C -> C/4`` matrix. "adapter share" is the adapter timed alone over the layer; "layer time over LSQ" is
``(layer - layer without adapter) / layer``, what the adapter adds inside the layer. A second table times the
per-token adapter alone against its hidden width, and (not in the library: a prototype for the estimate) its
``C -> C/4`` matrix in int8 through ``torch._int_mm``, with the per-token input quantization it needs. Medians
of interleaved runs in CPU time of one thread (run with ``OMP_NUM_THREADS=1``).

    OMP_NUM_THREADS=1 python benchmarks/adapter_cost.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from asqpost import QATConfig, StepAdapter, calibrate, prepare_qat
from asqpost.export import convert_to_packed
from asqpost.masking import token_mask
from common import machine, table

REDUCTIONS = (4, 8, 16, 32)
SHAPES = [((1, 32, 384), 384), ((8, 128, 384), 384), ((8, 128, 1536), 384)]


def packed_layer(channels: int, out: int, act: str, per_token: bool = False) -> nn.Module:
    """A calibrated W4A8 POST + ``act`` (``asq`` or ``lsq``) ``Linear(channels, out)``, packed; signed input (as
    MiniLM's). The same seed gives both the same weights and codes, so their difference is the adapter."""
    torch.manual_seed(0)
    extra = {"per_token": per_token} if act == "asq" else {}
    config = QATConfig.recipe(f"post-{act}", 4, act={"bits": 8, **extra}, first=None, last=None)
    qat = prepare_qat(nn.Sequential(nn.Linear(channels, out)), config).eval()
    calibrate(qat, [torch.randn(4, 32, channels) for _ in range(2)])
    if act == "asq":
        with torch.no_grad():  # a trained-looking adapter: beta depends on its input
            qat[0].input_quantizer.adapter.out.weight.normal_(std=0.3)
    return convert_to_packed(qat)[0]


def cpu_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median CPU seconds of this thread per call, calls interleaved. CPU time, not wall time: on a loaded machine
    a call longer than a scheduler slice shares the core with other jobs and its wall time grows with the load,
    while one thread's CPU time stays what the work costs (all of it runs in this thread at one thread)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            times[name].append(time.thread_time() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def stage_timers(layer: nn.Module, plain: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    adapter = layer.input_quant.adapter
    z = adapter.statistics(x)
    first = adapter.hidden or adapter.out

    def statistics():
        if hasattr(adapter, "_statistics_and_scale"):  # both from one masked copy, where the adapter has it
            adapter._statistics_and_scale(x)
        else:
            adapter.statistics(x)
            adapter.input_scale(x)

    return {
        "layer": lambda: layer(x),
        "layer without adapter": lambda: plain(x),
        "adapter": lambda: adapter(x),
        "statistics": statistics,
        "hidden matrix": lambda: F.linear(z, first.weight),
    }


def padding_mask(shape: tuple[int, ...]) -> torch.Tensor:
    """A token mask as a padded batch has: the last sample's final quarter is padding (one sample: no padding)."""
    mask = torch.ones(shape[:2], dtype=torch.bool)
    if shape[0] > 1:
        mask[-1, -shape[1] // 4 :] = False
    return mask


MODES = (("per sample", False, False), ("per sample, token mask", False, True), ("per token", True, False))


def share_rows(repeats: int) -> list[list[str]]:
    rows = []
    for shape, out in SHAPES:
        plain = packed_layer(shape[-1], out, "lsq")
        for label, per_token, masked in MODES:
            layer = packed_layer(shape[-1], out, "asq", per_token)
            x = torch.randn(shape)
            with token_mask(padding_mask(shape) if masked else None):
                ms = {k: v * 1e3 for k, v in cpu_medians(stage_timers(layer, plain, x), repeats).items()}
            rows.append(
                [
                    f"{shape} -> {out}",
                    label,
                    layer.plans.describe(torch.device("cpu"))[0],
                    f"{ms['layer']:.3f}",
                    f"{ms['layer without adapter']:.3f}",
                    f"{ms['adapter']:.3f}",
                    f"{100 * ms['adapter'] / ms['layer']:.0f}%",
                    f"{100 * (ms['layer'] - ms['layer without adapter']) / ms['layer']:.0f}%",
                    f"{ms['statistics']:.3f}",
                    f"{ms['hidden matrix']:.3f}",
                ]
            )
    return rows


def int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` rounded to int8 per row, transposed for ``torch._int_mm``, and its row scales (done at load)."""
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(weight / scale[:, None]).to(torch.int8).T.contiguous(), scale


def int8_matrix(x: torch.Tensor, w_int: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Prototype: ``x @ weight.T`` with ``x`` rounded to int8 per token (exact int32 sums, one rescale); what an
    8-bit adapter matrix would cost per call."""
    rows = x.reshape(-1, x.shape[-1])
    x_scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    x_int = torch.round(rows / x_scale).to(torch.int8)
    return torch._int_mm(x_int, w_int) * (x_scale * w_scale)


def reduction_rows(repeats: int) -> list[list[str]]:
    """The per-token adapter alone against its hidden width ``C / reduction`` (the cost it cannot shed while it
    stays a float ``C -> C / reduction`` matrix per token), and its float and int8 matrix at reduction 4."""
    rows = []
    for shape, _ in SHAPES:
        x = torch.randn(shape)
        adapters = {r: StepAdapter(shape[-1], reduction=r, per_token=True, form="scale") for r in REDUCTIONS}
        fns = {r: (lambda a=a, x=x: a(x)) for r, a in adapters.items()}
        weight = adapters[4].hidden.weight
        fns["float"] = lambda x=x, w=weight: F.linear(x, w)
        w_int, w_scale = int8_weight(weight)
        fns["int8"] = lambda x=x, w=w_int, s=w_scale: int8_matrix(x, w, s)
        ms = {k: f"{v * 1e3:.3f}" for k, v in cpu_medians(fns, repeats).items()}
        rows.append([str(shape), *(ms[r] for r in REDUCTIONS), ms["float"], ms["int8"]])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if torch.get_num_threads() != 1:
        raise SystemExit("CPU time of one thread measures the work only at one thread: set OMP_NUM_THREADS=1")
    with torch.no_grad():
        shares, reductions = share_rows(args.repeats), reduction_rows(args.repeats)
    print(f"machine: {machine()}")
    header = ["input -> out", "ASQ", "path", "layer ms", "layer without adapter ms", "adapter ms", "adapter share"]
    print(table([*header, "layer time over LSQ", "statistics ms", "hidden matrix ms"], shares))
    print("\nper-token adapter alone (ms) by hidden width C / reduction")
    header = ["input", *(f"reduction {r}" for r in REDUCTIONS), "C -> C/4 matrix float", "int8 (prototype)"]
    print(table(header, reductions))


if __name__ == "__main__":
    main()
