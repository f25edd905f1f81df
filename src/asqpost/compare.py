"""``asqpost compare``: a grid of methods x bits x seeds from one float checkpoint, with one budget for all.

Each cell is a QAT run (or a float fine-tune for ``float``) written to ``OUT/cells/<method>-w<bits>-s<seed>/``
as soon as it finishes; a cell with a ``final.json`` is skipped when the command runs again, so a grid can be
completed over several runs, or by several processes sharing one ``OUT`` (every write is atomic).
``OUT/results.md`` (mean and spread over seeds of clean and shifted accuracy, and model size) and
``OUT/accuracy.png`` are rewritten after every cell. With ``beta=True`` (``asqpost compare --beta``) every cell
with ASQ layers also gets its beta report (``beta.json``, ``beta.md``, ``beta.png``, :mod:`asqpost.beta_report`) on
the test set, and the report two columns: the mean over its layers of beta(4x) / beta(1x) and beta(0.25x) / beta(1x).
"""

from __future__ import annotations

import io
import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .beta_report import DEFAULT_GAINS, NoASQLayersError, write_beta_report
from .config import split_recipe
from .files import atomic_write_bytes
from .registry import FLOAT, get_method
from .runconfig import RECIPE_SETTINGS, RunConfig
from .train.evaluation import beta_report_checkpoint
from .train.run import fit

log = logging.getLogger(__name__)

# the default grid: a choice of recipes (any of config.recipe_names() can be asked for)
DEFAULT_METHODS = (FLOAT, "lsq", "lsq-asq", "post-lsq", "post-asq", "pot-lsq", "apot-lsq")
FLOAT_LABEL = "float (same fine-tune budget)"
# record key -> input gain: the mean over a cell's ASQ layers of mean beta at that gain over mean beta at gain 1
BETA_RATIOS = {"beta_4_over_1": 4.0, "beta_0.25_over_1": 0.25}
BETA_COLUMNS = ("beta(4x)/beta(1x)", "beta(0.25x)/beta(1x)")


def method_label(method: str) -> str:
    """The report's name for a grid method: ``POST (W) + ASQ (A)`` from the registered methods' labels."""
    if method == FLOAT:
        return FLOAT_LABEL
    weight, act = split_recipe(method)
    return f"{get_method(weight).label} (W) + {get_method(act).label} (A)"


def cell_name(method: str, bits: int | None, seed: int) -> str:
    return f"{method}-s{seed}" if method == FLOAT else f"{method}-w{bits}-s{seed}"


def run_grid(
    base: RunConfig,
    init: str,
    out_dir: str | Path,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    bits: tuple[int, ...] = (2, 3, 4),
    seeds: tuple[int, ...] = (0, 1),
    on_cell: Callable[[dict[str, Any]], None] | None = None,
    beta: bool = False,
) -> list[dict[str, Any]]:
    """Run (or reuse) every cell; returns one record per cell (with :data:`BETA_RATIOS` keys when ``beta``)."""
    for method in methods:
        if method != FLOAT:
            split_recipe(method)  # fail fast on an unknown method name
    out = Path(out_dir)
    # seed-major: a complete table for the first seed comes first if the grid is stopped part-way
    cells = [
        (m, None if m == FLOAT else b, s) for s in seeds for b in bits for m in methods if m != FLOAT or b == bits[0]
    ]
    records = []
    for method, b, seed in cells:
        cell_dir = out / "cells" / cell_name(method, b, seed)
        final_path = cell_dir / "final.json"
        if not final_path.is_file():
            policy = {k: v for k, v in (base.quant or {}).items() if k in RECIPE_SETTINGS}
            quant = None if method == FLOAT else {**policy, "recipe": method, "bits": b}
            log.info("compare: running %s", cell_dir.name)
            fit(base.replace(quant=quant, init=init, seed=seed, stop_after=None), cell_dir)
        final = json.loads(final_path.read_text())
        record = {"method": method, "bits": b, "seed": seed, **{k: v for k, v in final.items() if k != "history"}}
        if beta and method != FLOAT:
            record.update(cell_beta_ratios(base, cell_dir))
        records.append(record)
        write_report(records, out, base, init)
        if on_cell:
            on_cell(record)
    return records


def cell_beta_ratios(base: RunConfig, cell_dir: Path) -> dict[str, float]:
    """:data:`BETA_RATIOS` of a finished cell, from its beta report (written on first use, then reused).

    Empty for a cell without ASQ layers. The report covers the run's test set (``test_subset`` included).
    """
    saved = cell_dir / "beta.json"
    if not saved.is_file():
        try:
            report = beta_report_checkpoint(
                cell_dir / "checkpoint.pt",
                base.data,
                base.data_root,
                gains=DEFAULT_GAINS,
                batch_size=base.eval_batch_size,
                device=base.device,
                subset=base.test_subset,
            )
        except NoASQLayersError:
            return {}
        write_beta_report(report, cell_dir)
    ratios = json.loads(saved.read_text())["mean_ratio_to_gain_1"]
    return {key: ratios[str(gain)] for key, gain in BETA_RATIOS.items()}


def _has_beta(records: list[dict[str, Any]]) -> bool:
    return any(key in r for r in records for key in BETA_RATIOS)


def _mean_spread(values: list[float]) -> str:
    mean = statistics.fmean(values) * 100
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values) * 100:.2f}"


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["bits"]), []).append(r)
    rows = []
    for (method, b), rs in groups.items():
        rows.append(
            {
                "method": method,
                "bits": b,
                "seeds": len(rs),
                "test": _mean_spread([r["test_acc"] for r in rs]),
                "shift": _mean_spread([r["shift_acc"] for r in rs]),
                "noise": _mean_spread([r["noise_acc"] for r in rs]) if all("noise_acc" in r for r in rs) else "-",
                "test_mean": statistics.fmean(r["test_acc"] for r in rs),
                "size_kib": rs[0]["size_bytes"] / 1024,
                **{key: statistics.fmean(r[key] for r in rs) for key in BETA_RATIOS if all(key in r for r in rs)},
            }
        )
    return rows


def markdown_table(records: list[dict[str, Any]], shifted: bool = True) -> str:
    """The report's table: one row per (method, bits), mean ± std over seeds; ``shifted=False`` leaves out the
    shifted and noise columns (what a one-seed run cannot back)."""
    with_beta = _has_beta(records)
    with_noise = shifted and any("noise_acc" in r for r in records)  # results written without it: no column
    columns = ["method", "bits (W/A)", "seeds", "test acc %", *(["shifted acc %"] if shifted else [])]
    columns += ["noise acc %"] if with_noise else []
    columns += ["size (KiB)", *(BETA_COLUMNS if with_beta else ())]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in summarize(records):
        bits = "32" if row["bits"] is None else f"{row['bits']}/{row['bits']}"
        label = method_label(row["method"])
        shift = f" {row['shift']} |" if shifted else ""
        noise = f" {row['noise']} |" if with_noise else ""
        line = f"| {label} | {bits} | {row['seeds']} | {row['test']} |{shift}{noise} {row['size_kib']:.1f} |"
        if with_beta:
            line += "".join(f" {row[k]:.3f} |" if k in row else " - |" for k in BETA_RATIOS)
        lines.append(line)
    return "\n".join(lines)


def write_report(records: list[dict[str, Any]], out: Path, base: RunConfig, init: str) -> None:
    header = (
        f"# asqpost compare\n\nmodel `{base.model}` on `{base.data}`, from `{init}`; every cell: {base.epochs} "
        f"epoch(s), batch {base.batch_size}, lr {base.lr}, train subset {base.train_subset or 'all'}. "
        "Mean ± sample std over seeds. First/last layer policy: "
        f"{(base.quant or {}).get('first', 8)}/{(base.quant or {}).get('last', 8)}. Shifted: each test image "
        "times a log-uniform gain in [0.25, 4] plus an offset in [-0.2, 0.2]; noise: each test image plus Gaussian "
        "noise of a std uniform in [0.05, 0.3].\n\n"
    )
    if _has_beta(records):
        header += (
            "Beta columns: the mean over a cell's ASQ layers of (mean beta with every test image times 4, or 0.25, "
            "before normalisation) / (mean beta at gain 1); a step that follows the input gives 4 and 0.25. Each "
            "cell's beta report: `cells/<cell>/beta.md`.\n\n"
        )
    atomic_write_bytes(out / "results.md", (header + markdown_table(records) + "\n").encode())
    atomic_write_bytes(out / "results.json", json.dumps(records, indent=2).encode())
    plot(records, out / "accuracy.png")


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against bits per method (float as a horizontal line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(records)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["bits"], r["test_mean"] * 100) for r in rows if r["method"] == method)
        if method == FLOAT:
            ax.axhline(pts[0][1], color="black", linestyle="--", label=FLOAT_LABEL)
        else:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method_label(method))
    ax.set_xlabel("bits (weights = activations)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
