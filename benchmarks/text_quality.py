"""Quality of quantized all-MiniLM-L6-v2 against the float model, on held-out real text.

Data: Debian ``fortunes`` (``apt-get install fortunes``): the library's fixed 80/20 split; every row sees the
same calibration texts, the same distillation texts (the ``minilm-distill`` recipe's ``train_subset``) and the
same held-out texts. Rows: float; torch ``quantize_dynamic`` int8; for each W/A width and method, PTQ
(calibration only, ``--calib`` texts) and, for the widths in ``--distill``, after distillation QAT with the
``minilm-distill`` recipe (one run per seed, same budget for all; ``--set`` passes more keys to every run).

Metrics against the float model's embeddings of the held-out texts: mean and min cosine; top-1 and top-10
retrieval agreement (each held-out text's nearest neighbours among the others, by the row's embeddings and by
the float ones: the share of equal first neighbours and the mean overlap of the ten nearest); and a labelled
task: topic (fortune file) accuracy of a logistic-regression probe trained on ``--probe`` train texts embedded
by the same row.

Rows (``--methods``): ``lsq-lsq``, ``post-asq``, ``post-asq-tok`` (per-token ASQ) by default, the ASQ rows with
the recipe's ``normalise_init`` (``post-asq-tok-rawinit``: per token with the step fitted to ``x``); also
``lsq-lsq-actlsq`` / ``post-asq-actlsq`` (activation steps from LSQ's ``2 mean|x| / sqrt(qmax)`` instead of the
default MSE search), ``lsq-lsq-smooth0.5`` / ``post-asq-smooth0.5`` (SmoothQuant, ``act.smooth``, alpha from
``--smooth``) and ``lsq-lsq-rot128`` / ``post-asq-rot128`` / ``post-asq-tok-rot128`` (Hadamard rotation of every
Linear input, ``act.rotate``, block from ``--rotate``). ``--distill-methods`` picks which of them are also
distilled.

Usage: ``HF_HUB_OFFLINE=1 python benchmarks/text_quality.py --out runs/text-quality [--distill 4/8 4/4]``.
Finished work is reused: distillation runs in ``OUT/runs``, each row's record in ``OUT/rows`` (delete them
after changing the data, ``--calib`` or ``--set``), so a run can be extended row by row and the table (over the
rows the arguments name) is written again each time; ``--cached-only`` computes nothing and leaves out the rows
not in ``OUT/rows``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn

from asqpost import QATConfig, calibrate, prepare_qat
from asqpost.cli import config_path
from asqpost.data import TextBatches, TextSet, fortunes
from asqpost.runconfig import load_run_config, merge, parse_set
from asqpost.text import load_tokenizer, pretrained_encoder, text_model_spec
from asqpost.train.checkpoint import build_from_checkpoint, load_checkpoint
from asqpost.train.run import fit
from common import machine, table


@dataclass(frozen=True)
class Method:
    """A table row's quantization: ``label`` in the table, ``recipe`` and ``act`` fields for ``QATConfig.recipe``."""

    label: str
    recipe: str
    act: dict


def methods(smooth: float, rotate: int = 128) -> dict[str, Method]:
    """The rows by name (``--methods``; the name also names distillation runs); ``smooth``: SmoothQuant's alpha,
    ``rotate``: the Hadamard rotation's largest block."""
    asq = {"normalise_init": True}  # as the recipe (configs/minilm-distill.yaml): the step fitted to x / r(x)
    return {
        "lsq-lsq": Method("LSQ + LSQ", "lsq-lsq", {}),
        "post-asq": Method("POST + ASQ", "post-asq", asq),
        "post-asq-tok": Method("POST + ASQ per token", "post-asq", {**asq, "per_token": True}),
        "post-asq-tok-rawinit": Method("POST + ASQ per token, step fitted to x", "post-asq", {"per_token": True}),
        "lsq-lsq-actlsq": Method("LSQ + LSQ, act init lsq", "lsq-lsq", {"init": "lsq"}),
        "post-asq-actlsq": Method("POST + ASQ, act init lsq", "post-asq", {**asq, "init": "lsq"}),
        f"lsq-lsq-smooth{smooth:g}": Method(f"LSQ + LSQ, SmoothQuant {smooth:g}", "lsq-lsq", {"smooth": smooth}),
        f"post-asq-smooth{smooth:g}": Method(
            f"POST + ASQ, SmoothQuant {smooth:g}", "post-asq", {**asq, "smooth": smooth}
        ),
        f"lsq-lsq-rot{rotate}": Method(f"LSQ + LSQ, rotated {rotate}", "lsq-lsq", {"rotate": rotate}),
        f"post-asq-rot{rotate}": Method(f"POST + ASQ, rotated {rotate}", "post-asq", {**asq, "rotate": rotate}),
        f"post-asq-tok-rot{rotate}": Method(
            f"POST + ASQ per token, rotated {rotate}", "post-asq", {**asq, "per_token": True, "rotate": rotate}
        ),
    }


DEFAULT_METHODS = ("lsq-lsq", "post-asq", "post-asq-tok")
RECIPE = "minilm-distill"


def subset(data: TextSet, count: int, seed: int) -> TextSet:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    return TextSet([data.texts[int(i)] for i in order], data.labels[order], data.topics)


@torch.no_grad()
def embed(model: nn.Module, data: TextSet, tokenizer, max_length: int) -> torch.Tensor:
    model.eval()
    batches = TextBatches(data, tokenizer, batch_size=50, max_length=max_length)
    return F.normalize(torch.cat([model(**inputs).float() for inputs in batches]), dim=-1)


def neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    return sim.topk(k, dim=1).indices


def metrics(emb: torch.Tensor, ref: torch.Tensor, probe_acc: float) -> dict[str, float]:
    cos = (emb * ref).sum(dim=1)
    mine, theirs = neighbours(emb, 10), neighbours(ref, 10)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(mine, theirs, strict=True)]
    return {
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "top1": float((mine[:, 0] == theirs[:, 0]).float().mean()),
        "top10": statistics.fmean(overlap),
        "probe": probe_acc,
    }


def probe_accuracy(train_emb, train_labels, test_emb, test_labels) -> float:
    clf = LogisticRegression(max_iter=2000, C=10.0)
    clf.fit(train_emb.numpy(), train_labels.numpy())
    return float(clf.score(test_emb.numpy(), test_labels.numpy()))


def qat_config(recipe: str, bits: int, act_bits: int, act: dict) -> QATConfig:
    return QATConfig.recipe(recipe, bits, act={**act, "bits": act_bits})


def cached(path: Path, compute: Callable[[], dict], only: bool = False) -> list[dict]:
    """A row's record from ``path`` when an earlier run wrote it, else ``compute()``, written there: as a list of
    one record, or none when ``only`` (use cached rows only) and there is none."""
    if path.exists():
        return [json.loads(path.read_text())]
    if only:
        logging.warning("no record %s yet: row left out", path.name)
        return []
    record = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(record, flush=True)
    return [record]


def distilled(out: Path, recipe: str, bits: int, act_bits: int, act: dict, seed: int, sets: list[str]) -> nn.Module:
    """The row's model distilled with the recipe; ``quant.*`` keys of ``--set`` are laid over the row's quant
    (which replaces the recipe's own), so ``--set quant.embeddings=4`` reaches every distilled row."""
    quant = merge({"recipe": recipe, "bits": bits, "act": {**act, "bits": act_bits}}, parse_set(sets).get("quant", {}))
    config = load_run_config(config_path(RECIPE), [*sets, f"seed={seed}"]).replace(quant=quant, progress=False)
    if not (out / "final.json").exists():
        fit(config, out, resume=(out / "checkpoint.pt").exists())
    return build_from_checkpoint(load_checkpoint(out / "checkpoint.pt"))


def fmt(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--widths", nargs="+", default=["8/8", "4/8", "4/4", "3/8"], help="W/A bits of PTQ rows")
    parser.add_argument("--distill", nargs="*", default=["4/8", "4/4"], help="W/A bits also distilled")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="rows (names in methods())")
    parser.add_argument(
        "--distill-methods", nargs="*", default=None, help="of those, the ones distilled (default: all of them)"
    )
    parser.add_argument("--smooth", type=float, default=0.5, help="SmoothQuant's alpha in the *-smooth rows")
    parser.add_argument("--rotate", type=int, default=128, help="the Hadamard block in the *-rot rows")
    parser.add_argument("--cached-only", action="store_true", help="compute nothing: the table of OUT/rows")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--calib", type=int, default=64, help="calibration texts (PTQ rows)")
    parser.add_argument("--held-out", type=int, default=400)
    parser.add_argument("--probe", type=int, default=1500, help="train texts for the topic probe")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="more recipe keys for distillation")
    args = parser.parse_args()
    table_methods = methods(args.smooth, args.rotate)
    unknown = sorted(set(args.methods) - set(table_methods))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(table_methods)}")
    distill_methods = set(args.methods if args.distill_methods is None else args.distill_methods)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = load_run_config(config_path(RECIPE), args.sets)
    spec = text_model_spec(recipe.model, dict(recipe.model_args))
    tokenizer = load_tokenizer(spec)
    float_model = pretrained_encoder(spec).eval()
    train, test = fortunes(recipe.data_root, "train"), fortunes(recipe.data_root, "test")
    held_out, probe_train, calib = (
        subset(test, args.held_out, 1),
        subset(train, args.probe, 2),
        subset(train, args.calib, 3),
    )
    length = recipe.max_length

    def evaluate(model: nn.Module) -> dict[str, float]:
        emb = embed(model, held_out, tokenizer, length)
        acc = probe_accuracy(embed(model, probe_train, tokenizer, length), probe_train.labels, emb, held_out.labels)
        return metrics(emb, reference(), acc)

    @functools.cache
    def reference() -> torch.Tensor:  # the float embeddings, computed once if a row needs them (cached rows don't)
        return embed(float_model, held_out, tokenizer, length)

    def ptq_row(method: Method, width: str) -> dict:
        bits, act_bits = (int(b) for b in width.split("/"))
        torch.manual_seed(0)  # the ASQ adapters' random initialisation: the same whatever rows ran before
        qat = prepare_qat(copy.deepcopy(float_model), qat_config(method.recipe, bits, act_bits, method.act)).eval()
        calibrate(qat, calib_batches)
        return {"row": method.label, "bits": width, "stage": "PTQ", **evaluate(qat)}

    def distilled_row(method: Method, width: str, run: str, seed: int) -> dict:
        bits, act_bits = (int(b) for b in width.split("/"))
        model = distilled(args.out / "runs" / run, method.recipe, bits, act_bits, method.act, seed, args.sets)
        return {"row": method.label, "bits": width, "stage": "distilled", "seed": seed, **evaluate(model)}

    def int8_row() -> dict:
        int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model), {nn.Linear}, torch.qint8)
        return {"row": "torch int8 dynamic", "bits": "8/8 (dynamic)", "stage": "PTQ", **evaluate(int8)}

    rows = args.out / "rows"
    float_row = {"row": "float", "bits": "32", "stage": "-"}
    only = args.cached_only
    records = cached(rows / "float.json", lambda: {**float_row, **evaluate(float_model)}, only)
    records += cached(rows / "int8-dynamic.json", int8_row, only)
    calib_batches = list(TextBatches(calib, tokenizer, batch_size=16, max_length=length))
    for width in args.widths:
        tag = "w{}a{}".format(*width.split("/"))
        for name in args.methods:
            method = table_methods[name]
            records += cached(rows / f"{name}-{tag}-ptq.json", functools.partial(ptq_row, method, width), only)
            for seed in args.seeds if width in args.distill and name in distill_methods else []:
                run = f"{name}-{tag}-s{seed}"
                compute = functools.partial(distilled_row, method, width, run, seed)
                records += cached(rows / f"{run}.json", compute, only)
            (args.out / "records.json").write_text(json.dumps(records, indent=1) + "\n")
    write_report(records, args, recipe)


def write_report(records: list[dict], args: argparse.Namespace, recipe) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["row"], r["bits"], r["stage"]), []).append(r)
    keys = ("cos_mean", "cos_min", "top1", "top10", "probe")
    rows = [[*key, len(rs), *(fmt([r[k] for r in rs]) for k in keys)] for key, rs in groups.items()]
    report = "\n".join(
        [
            f"all-MiniLM-L6-v2 against float on {args.held_out} held-out fortunes; distillation: `{RECIPE}` "
            f"(train_subset {recipe.train_subset}, {recipe.epochs} epoch(s), lr {recipe.lr:g}, hidden-state loss "
            f"{'on' if recipe.distill.get('hidden_states') else 'off'}); machine: {machine()}",
            "",
            table(
                [
                    "method",
                    "bits (W/A)",
                    "stage",
                    "runs",
                    "cos mean",
                    "cos min",
                    "top-1 agree",
                    "top-10 overlap",
                    "topic probe acc",
                ],
                rows,
            ),
        ]
    )
    print(report)
    (args.out / "results.md").write_text(report + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
