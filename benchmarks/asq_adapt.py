"""Does ASQ's step follow each sample, and does that buy robustness static steps lack?

Runs (or reads) one ``asqpost compare`` grid per variant, all from the same float checkpoint with the QAT
budget of docs/results.md (one epoch on a fixed 20k-image subset), and writes one table over every variant: clean
accuracy, the gain shift (``eval --shift``), the noise shift (``eval --shift noise``), and each ASQ variant's mean
beta(4x) / beta(1x) and beta(0.25x) / beta(1x) (over layers, then seeds), plus a plot of mean beta per gain.

    python benchmarks/asq_adapt.py --init runs/fmnist-float/checkpoint.pt --runs runs/asq-adapt \\
        --out benchmarks/results/fmnist-asq-adapt [--bits 2 4] [--seeds 0 1 2] [--report-only]

``--runs`` holds the compare folders (``RUNS/w<bits>/<variant>``; finished cells are reused, so a grid can be
stopped and continued); ``--out`` gets each finished cell's ``final.json``, ``config.yaml`` and ``beta.json``
(no checkpoints), ``results.md``, ``results.json`` and ``beta.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

# variant name -> (methods, --set overrides); every cell also gets the same QAT budget (BUDGET)
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "mse": (("post-lsq", "lsq-lsq"), ("quant.act.init=mse",)),
    "asq-paper-mse": (("post-asq",), ("quant.act.init=mse",)),
    "asq-scale-mse": (("post-asq",), ("quant.act.init=mse", "quant.act.adapter_form=scale")),
    "lsqinit": (("post-lsq",), ("quant.act.init=lsq",)),
    "pct": (("post-lsq",), ("quant.act.init=percentile",)),
    "asq-scale-mse-aug2": (
        ("post-asq",),
        ("quant.act.init=mse", "quant.act.adapter_form=scale", "gain_augment=2"),
    ),
    "mse-aug2": (("post-lsq",), ("quant.act.init=mse", "gain_augment=2")),
    "asq-paper-mse-aug2": (("post-asq",), ("quant.act.init=mse", "gain_augment=2")),
}
BUDGET = ("epochs=1", "train_subset=20000", "threads=2")
METRICS = (("test_acc", "clean %"), ("shift_acc", "gain shift %"), ("noise_acc", "noise shift %"))


def run_variant(name: str, bits: int, seeds: list[int], init: str, runs: Path) -> None:
    methods, sets = VARIANTS[name]
    command = [sys.executable, "-m", "asqpost.cli", "compare", "-c", "fashion-resnet20-qat", "--init", init]
    for item in (*BUDGET, *sets):
        command += ["--set", item]
    command += ["--out", str(runs / f"w{bits}" / name), "--methods", *methods, "--bits", str(bits), "--beta"]
    command += ["--seeds", *map(str, seeds)]
    print(f"== {name} w{bits}", flush=True)
    subprocess.run(command, check=True)


def label(config: dict) -> str:
    """A row's name from a cell's resolved run config: weights + activations, act init, form, augmentation."""
    quant = config["quant"]
    weight, _, act = quant["recipe"].partition("-")
    act_fields = quant.get("act") or {}
    name = f"{weight.upper()} + {act.upper()}"
    if act == "asq":
        name += f" ({act_fields.get('adapter_form', 'paper')})"
    name += f", init {act_fields.get('init') or 'lsq'}"
    if config.get("gain_augment"):
        name += f", gain aug {config['gain_augment']:g}"
    return name


def collect(runs: Path, out: Path) -> list[dict]:
    """Copy every finished cell's small files from ``runs`` to ``out``; one record per cell."""
    records = []
    for final in sorted(runs.glob("w*/*/cells/*/final.json")):
        variant, cell = final.parents[2].name, final.parent.name
        dest = out / final.parents[3].name / variant / cell
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("final.json", "config.yaml", "beta.json"):
            if (final.parent / name).is_file():
                shutil.copy2(final.parent / name, dest / name)
    for final in sorted(out.glob("w*/*/*/final.json")):
        config = yaml.safe_load((final.parent / "config.yaml").read_text())
        if config.get("quant") is None:
            continue
        beta_file = final.parent / "beta.json"
        record = {
            "variant": final.parents[1].name,
            "label": label(config),
            "bits": config["quant"]["bits"],
            "seed": config["seed"],
            **{k: v for k, v in json.loads(final.read_text()).items() if k != "history"},
        }
        if beta_file.is_file():
            record["beta_by_gain"] = json.loads(beta_file.read_text())["mean_ratio_to_gain_1"]
        records.append(record)
    return records


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table(records: list[dict]) -> str:
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["bits"], r["label"]), []).append(r)
    header = ["bits (W/A)", "method", "seeds", *(title for _, title in METRICS)]
    header += ["beta(4x)/beta(1x)", "beta(0.25x)/beta(1x)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (bits, name), rs in sorted(groups.items()):
        cells = [f"{bits}/{bits}", name, str(len(rs))]
        cells += [_mean_std([r[key] for r in rs if key in r]) for key, _ in METRICS]
        for gain in ("4.0", "0.25"):
            ratios = [r["beta_by_gain"][gain] for r in rs if "beta_by_gain" in r]
            cells.append(_mean_std(ratios, scale=1.0, digits=3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    bits_list = sorted({r["bits"] for r in records if "beta_by_gain" in r})
    if not bits_list:
        return
    fig, axes = plt.subplots(1, len(bits_list), figsize=(5.5 * len(bits_list), 4.2), squeeze=False)
    for ax, bits in zip(axes[0], bits_list, strict=True):
        by_label: dict[str, list[dict]] = {}
        for r in records:
            if r["bits"] == bits and "beta_by_gain" in r:
                by_label.setdefault(r["label"], []).append(r)
        for name, rs in sorted(by_label.items()):
            gains = sorted(float(g) for g in rs[0]["beta_by_gain"])
            means = [statistics.fmean(r["beta_by_gain"][str(g)] for r in rs) for g in gains]
            ax.plot(gains, means, marker="o", label=name)
        ax.plot(gains, gains, "k--", linewidth=0.8, label="beta = gain (full following)")
        ax.set(xscale="log", yscale="log", xlabel="input gain", ylabel="mean beta / beta at gain 1")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(FixedLocator(gains))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_locator(NullLocator())
        ax.set_title(f"W{bits}A{bits}: mean over layers and seeds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", help="float checkpoint every cell starts from (not needed with --report-only)")
    parser.add_argument("--runs", type=Path, default=Path("runs/asq-adapt"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fmnist-asq-adapt"))
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--report-only", action="store_true", help="only collect finished cells and report")
    args = parser.parse_args()
    if not args.report_only:
        if not args.init:
            parser.error("--init is required unless --report-only")
        for bits in args.bits:
            for name in args.variants:
                run_variant(name, bits, args.seeds, args.init, args.runs)
    records = collect(args.runs, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(records, indent=1))
    text = table(records)
    (args.out / "results.md").write_text(text + "\n")
    plot(records, args.out / "beta.png")
    print(text)


if __name__ == "__main__":
    main()
