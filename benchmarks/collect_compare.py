"""Merge compare runs' per-cell results (not their checkpoints) into one folder and rewrite its report.

``python benchmarks/collect_compare.py DEST SRC [SRC ...]``, e.g.
``python benchmarks/collect_compare.py benchmarks/results/fmnist-resnet20 runs/cmp runs/cmp-s1``: copies every
finished cell's ``final.json`` and ``config.yaml`` and rewrites ``results.md``, ``results.json`` and
``accuracy.png`` from all cells in DEST. Copy DEST's ``cells`` back under a run folder and ``asqpost compare
--out`` skips them, so a grid can be finished by a later run or by several processes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

from asqpost.compare import write_report
from asqpost.runconfig import RunConfig


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    dest, sources = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    for src in sources:
        for final in sorted(src.glob("cells/*/final.json")):
            cell = dest / "cells" / final.parent.name
            cell.mkdir(parents=True, exist_ok=True)
            for name in ("final.json", "config.yaml"):
                shutil.copy2(final.parent / name, cell / name)
    records, config = [], None
    for final in sorted(dest.glob("cells/*/final.json")):
        run = RunConfig.from_dict(yaml.safe_load((final.parent / "config.yaml").read_text()))
        method = "float" if run.quant is None else run.quant["recipe"]
        bits = None if run.quant is None else run.quant["bits"]
        result = json.loads(final.read_text())
        records.append(
            {"method": method, "bits": bits, "seed": run.seed, **{k: v for k, v in result.items() if k != "history"}}
        )
        if config is None or (config.quant is None and run.quant is not None):
            config = run  # a quantized cell's config carries the first/last policy for the report
    if config is None:
        raise SystemExit(f"no finished cells under {sources}")
    order = {m: i for i, m in enumerate(("float", "lsq", "lsq-asq", "post-lsq", "post-asq", "pot-lsq", "apot-lsq"))}
    records.sort(key=lambda r: (r["bits"] or 0, order.get(r["method"], 99), r["seed"]))
    write_report(records, dest, config, config.init or "")
    print(f"{len(records)} cells in {dest}")


if __name__ == "__main__":
    main()
