"""Copy a compare run's report and per-cell results (not its checkpoints) into the repository.

``python benchmarks/collect_compare.py runs/cmp benchmarks/results/fmnist-resnet20``: copies results.md,
results.json, accuracy.png and every ``cells/*/final.json`` and ``config.yaml``. Copy the folder back under a
run directory and ``asqpost compare --out`` skips those cells, so a grid can be finished by a later session.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("results.md", "results.json", "accuracy.png"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    for final in sorted(src.glob("cells/*/final.json")):
        cell = dst / "cells" / final.parent.name
        cell.mkdir(parents=True, exist_ok=True)
        for name in ("final.json", "config.yaml"):
            shutil.copy2(final.parent / name, cell / name)
    print(f"copied {len(list(src.glob('cells/*/final.json')))} finished cells to {dst}")


if __name__ == "__main__":
    main()
