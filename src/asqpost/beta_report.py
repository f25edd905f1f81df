"""Beta, ASQ's per-sample step factor, measured over a dataset: its distribution per layer and its gain response.

Every ASQ activation quantizer (the input of one quantized layer) gets a forward pre-hook that calls
``quantizer.beta(x)`` on the layer's input and folds the values (one per sample, or one per token with
``per_token`` on ``(N, T, C)`` inputs) into running statistics (:class:`RunningStats`: count, mean, sum of
squared deviations, min, max). Nothing else is kept, so a report over a whole dataset costs no memory.

The gain response runs the same images once per gain ``g``: the raw image in [0, 1] (after the ``--shift``
perturbation when that is asked for) times ``g``, then the model's normalisation, ``normalize(g * x)``: the same
place where ``--shift`` applies its per-sample gain. A step that follows the sample would scale like ``g``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import Normalizer, TensorBatches
from .files import atomic_write_bytes
from .quantizers import ASQQuantizer

DEFAULT_GAINS = (0.25, 0.5, 1.0, 2.0, 4.0)
REFERENCE_GAIN = 1.0
GAIN_PLACEMENT = "the raw [0, 1] image times g before the model's normalisation, after --shift when set"
REPORT_FILES = ("beta.json", "beta.md", "beta.png")


class NoASQLayersError(ValueError):
    """The model has no ASQ activation quantizer, so there is no beta to report."""


@dataclass
class RunningStats:
    """Streaming count / mean / population std / min / max of the values added, in float64.

    Each batch is merged with Chan et al.'s update of (count, mean, sum of squared deviations): unlike a running
    sum of squares, it keeps the std exact when it is tiny next to the mean (beta is often 1 +- 1e-4).
    """

    count: int = 0
    running_mean: float = 0.0
    sq_dev: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().double().flatten()
        n = v.numel()
        if not n:
            return
        batch_mean = float(v.mean())
        total = self.count + n
        delta = batch_mean - self.running_mean
        self.sq_dev += float(((v - batch_mean) ** 2).sum()) + delta**2 * self.count * n / total
        self.running_mean += delta * n / total
        self.count = total
        self.low = min(self.low, float(v.min()))
        self.high = max(self.high, float(v.max()))

    @property
    def mean(self) -> float:
        return self.running_mean if self.count else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.sq_dev / self.count) if self.count else math.nan

    def as_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "mean": self.mean, "std": self.std, "min": self.low, "max": self.high}


def asq_quantizers(model: nn.Module) -> dict[str, ASQQuantizer]:
    """The model's ASQ quantizers, keyed by the name of the layer whose input each one quantizes."""
    return {
        name.removesuffix(".input_quantizer"): module
        for name, module in model.named_modules()
        if isinstance(module, ASQQuantizer)
    }


def require_asq(model: nn.Module, source: str) -> dict[str, ASQQuantizer]:
    quantizers = asq_quantizers(model)
    if not quantizers:
        raise NoASQLayersError(
            f"{source} has no ASQ layers: beta is the per-sample step factor of ASQ activation quantizers, and "
            "this model's activations are float or quantized with a static step (LSQ); nothing to report"
        )
    return quantizers


def _record(stats: RunningStats, units: dict[str, str], name: str, quantizer: ASQQuantizer, args: tuple) -> None:
    x = args[0]
    units[name] = "token" if quantizer.config.per_token and x.dim() == 3 else "sample"
    stats.add(quantizer.beta(x))


@torch.no_grad()
def collect_beta(model: nn.Module, inputs: Iterable[torch.Tensor]) -> tuple[dict[str, RunningStats], dict[str, str]]:
    """Per ASQ layer: running statistics of beta over every input batch (eval mode), and its unit."""
    quantizers = require_asq(model, type(model).__name__)
    stats = {name: RunningStats() for name in quantizers}
    units: dict[str, str] = {}
    handles = [q.register_forward_pre_hook(partial(_record, stats[n], units, n)) for n, q in quantizers.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for x in inputs:
            model(x.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return stats, units


@dataclass(frozen=True)
class GainedNormalizer(Normalizer):
    """The normalisation of ``gain * x``: a raw [0, 1] image scaled by ``gain`` before it is normalised."""

    gain: float = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(x * self.gain)


def gained_inputs(batches: TensorBatches, gain: float) -> Iterable[torch.Tensor]:
    """The model inputs of ``batches`` with every raw image times ``gain`` before normalisation."""
    norm = batches.normalizer
    gained = dataclasses.replace(batches, normalizer=GainedNormalizer(norm.mean, norm.std, gain))
    return (x for x, _ in gained)


def check_gains(gains: Iterable[float]) -> tuple[float, ...]:
    """Sorted, distinct, positive gains; the reference gain 1 is always among them (the ratios refer to it)."""
    gains = tuple(float(g) for g in gains)
    bad = [g for g in gains if not (math.isfinite(g) and g > 0)]
    if bad:
        raise ValueError(f"gains must be positive and finite, got {bad}")
    return tuple(sorted(set(gains) | {REFERENCE_GAIN}))


@dataclass
class BetaReport:
    """Beta statistics per gain and layer; ``by_gain[1.0]`` is the distribution over the unscaled data."""

    gains: tuple[float, ...]
    by_gain: dict[float, dict[str, RunningStats]]
    units: dict[str, str]
    source: str = ""

    @property
    def layers(self) -> list[str]:
        return list(self.by_gain[REFERENCE_GAIN])

    def mean_by_gain(self, layer: str) -> list[float]:
        return [self.by_gain[g][layer].mean for g in self.gains]

    def ratio(self, gain: float, layer: str) -> float:
        """Mean beta at ``gain`` over mean beta at gain 1 for one layer."""
        return self.by_gain[gain][layer].mean / self.by_gain[REFERENCE_GAIN][layer].mean

    def mean_ratio(self, gain: float) -> float:
        """The mean over layers of :meth:`ratio` (a step that follows the input gives ``gain``)."""
        return sum(self.ratio(gain, layer) for layer in self.layers) / len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "gains": list(self.gains),
            "gain_applied_to": GAIN_PLACEMENT,
            "layers": {
                layer: {
                    "unit": self.units[layer],
                    **self.by_gain[REFERENCE_GAIN][layer].as_dict(),
                    "mean_by_gain": dict(zip(map(str, self.gains), self.mean_by_gain(layer), strict=True)),
                }
                for layer in self.layers
            },
            "mean_ratio_to_gain_1": {str(g): self.mean_ratio(g) for g in self.gains},
        }

    def markdown(self) -> str:
        lines = [
            f"beta over the data (gain 1), per ASQ layer{f' of {self.source}' if self.source else ''}:",
            "",
            "| layer | per | count | mean | std | min | max |",
            "|---|---|---|---|---|---|---|",
        ]
        for layer in self.layers:
            s = self.by_gain[REFERENCE_GAIN][layer]
            lines.append(
                f"| {layer} | {self.units[layer]} | {s.count} | {s.mean:.4f} | {s.std:.3g} | {s.low:.4f} | "
                f"{s.high:.4f} |"
            )
        gain_cols = " | ".join(f"g={g:g}" for g in self.gains)
        lines += [
            "",
            f"mean beta per input gain g ({GAIN_PLACEMENT}); a step that follows the input scales like g:",
            "",
            f"| layer | {gain_cols} | beta(g={self.gains[-1]:g}) / beta(g=1) |",
            "|---|" + "---|" * (len(self.gains) + 1),
        ]
        for layer in self.layers:
            means = " | ".join(f"{m:.4f}" for m in self.mean_by_gain(layer))
            lines.append(f"| {layer} | {means} | {self.ratio(self.gains[-1], layer):.4f} |")
        means = " | ".join(f"{self.mean_ratio(g):.4f}" for g in self.gains)
        lines.append(f"| mean ratio to g=1 over layers | {means} | {self.mean_ratio(self.gains[-1]):.4f} |")
        return "\n".join(lines)

    def plot_png(self) -> bytes:
        """Mean beta against gain, one line per layer, log-log, with ``beta proportional to g`` for reference."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter

        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for layer in self.layers:
            ax.plot(self.gains, self.mean_by_gain(layer), marker="o", markersize=3, linewidth=1, label=layer)
        ax.plot(self.gains, self.gains, color="black", linestyle="--", linewidth=1, label="beta = g (follows input)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)  # ticks at powers of two, wherever beta lies
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("input gain g (raw image times g, before normalisation)")
        ax.set_ylabel("mean beta")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        return buffer.getvalue()


def beta_report(
    model: nn.Module,
    inputs_at_gain: Callable[[float], Iterable[torch.Tensor]],
    gains: Iterable[float] = DEFAULT_GAINS,
    source: str = "",
) -> BetaReport:
    """Beta statistics of every ASQ layer of ``model`` over ``inputs_at_gain(g)`` for each gain (and gain 1)."""
    require_asq(model, source or type(model).__name__)
    checked = check_gains(gains)
    by_gain: dict[float, dict[str, RunningStats]] = {}
    units: dict[str, str] = {}
    for gain in checked:
        by_gain[gain], units = collect_beta(model, inputs_at_gain(gain))
    return BetaReport(checked, by_gain, units, source)


def write_beta_report(report: BetaReport, out_dir: str | Path) -> list[Path]:
    """``beta.json``, ``beta.md`` and ``beta.png`` in ``out_dir`` (each written atomically); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    contents = (
        json.dumps(report.to_dict(), indent=2).encode(),
        (report.markdown() + "\n").encode(),
        report.plot_png(),
    )
    paths = [out / name for name in REPORT_FILES]
    for path, data in zip(paths, contents, strict=True):
        atomic_write_bytes(path, data)
    return paths
