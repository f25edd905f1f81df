"""Test-only hook, not a feature: hold a training run at a chosen step so a test can signal it there.

With ``ASQPOST_TEST_PAUSE_AT=<epoch>:<step>:<marker file>`` in the environment (epoch and step count from 1),
the run, right after optimizer step ``<step>`` of epoch ``<epoch>``, writes ``<marker file>`` (JSON: epoch,
step, steps in the epoch, pid) and then blocks until a signal ends it: SIGKILL, or SIGINT, whose
``KeyboardInterrupt`` is raised from the block as it would be from anywhere in the loop. The fault tests
(tests/reliability/test_faults.py) use it to kill or interrupt a run mid-epoch by construction rather than by
timing. Unset, it costs one environment lookup per epoch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "ASQPOST_TEST_PAUSE_AT"
BLOCK_SECONDS = 600.0  # a test that never signals gets an error instead of a run blocked for ever


@dataclass(frozen=True)
class PausePoint:
    epoch: int
    step: int
    marker: Path

    def check(self, epoch: int, step: int, steps_in_epoch: int | None) -> None:
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
        raise RuntimeError(f"{ENV}: held at epoch {epoch}, step {step} for {BLOCK_SECONDS:.0f} s and never signalled")


def requested() -> PausePoint | None:
    """The pause point the environment asks for, or ``None`` (always, outside the fault tests)."""
    value = os.environ.get(ENV)
    if not value:
        return None
    try:
        epoch, step, marker = value.split(":", 2)
        return PausePoint(int(epoch), int(step), Path(marker))
    except ValueError as err:
        raise ValueError(f"{ENV}={value!r}: expected <epoch>:<step>:<marker file>") from err
