"""Run the ``asqpost`` command line held at one training step, for the fault tests.

``python paused_run.py EPOCH STEP MARKER ARGS...`` runs ``asqpost ARGS...`` with a step hook
(:func:`asqpost.train.engine.register_step_hook`) that, right after optimizer step ``STEP`` of epoch ``EPOCH``
(both from 1), writes ``MARKER`` (JSON: epoch, step, steps in the epoch, pid) and then blocks until a signal ends
it: SIGKILL, or SIGINT, whose ``KeyboardInterrupt`` is raised from the block as it would be from anywhere in the
loop. The tests kill or interrupt a run mid-epoch by construction rather than by timing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from asqpost.cli import main
from asqpost.train.engine import register_step_hook

BLOCK_SECONDS = 600.0  # a test that never signals gets an error instead of a run blocked for ever


@dataclass(frozen=True)
class PausePoint:
    epoch: int
    step: int
    marker: Path

    def __call__(self, epoch: int, step: int, steps_in_epoch: int | None) -> None:
        """Block here if ``(epoch, step)`` (from 1) is this point; otherwise return at once."""
        if (epoch, step) != (self.epoch, self.step):
            return
        record = {"epoch": epoch, "step": step, "steps_in_epoch": steps_in_epoch, "pid": os.getpid()}
        partial = self.marker.with_name(self.marker.name + ".partial")
        partial.write_text(json.dumps(record))
        os.replace(partial, self.marker)  # the test never reads half a marker
        deadline = time.monotonic() + BLOCK_SECONDS
        while time.monotonic() < deadline:
            time.sleep(0.1)  # short naps: a SIGINT that another thread took is still raised here within 0.1 s
        raise RuntimeError(f"held at epoch {epoch}, step {step} for {BLOCK_SECONDS:.0f} s and never signalled")


if __name__ == "__main__":
    epoch, step, marker, *args = sys.argv[1:]
    register_step_hook(PausePoint(int(epoch), int(step), Path(marker)))
    sys.exit(main(args))
