"""Run the ``asqpost`` command line held at one training step, for the fault tests.

``python paused_run.py EPOCH STEP FD ARGS...`` runs ``asqpost ARGS...`` with a step hook
(:func:`asqpost.train.engine.register_step_hook`) that, right after optimizer step ``STEP`` of epoch ``EPOCH``
(both from 1), writes one JSON line (epoch, step, steps in the epoch, pid) to the inherited file descriptor
``FD``, closes it, and then blocks until a signal ends it: SIGKILL, or SIGINT, whose ``KeyboardInterrupt`` is
raised from the block as it would be from anywhere in the loop. The test reads the line from its end of the
pipe, so the signal lands at that step by construction: nothing waits for a moment of time.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass

from asqpost.cli import main
from asqpost.train.engine import register_step_hook

BLOCK_SECONDS = 600.0  # a test that never signals gets an error instead of a run blocked for ever


@dataclass(frozen=True)
class PausePoint:
    epoch: int
    step: int
    fd: int

    def __call__(self, epoch: int, step: int, steps_in_epoch: int | None) -> None:
        """Block here if ``(epoch, step)`` (from 1) is this point; otherwise return at once."""
        if (epoch, step) != (self.epoch, self.step):
            return
        record = {"epoch": epoch, "step": step, "steps_in_epoch": steps_in_epoch, "pid": os.getpid()}
        with os.fdopen(self.fd, "w") as pipe:  # the test reads this line, then signals
            pipe.write(json.dumps(record) + "\n")
        # a lock wait that a signal interrupts (SIGINT raises KeyboardInterrupt here); it never times out early
        threading.Event().wait(BLOCK_SECONDS)
        raise RuntimeError(f"held at epoch {epoch}, step {step} for {BLOCK_SECONDS:.0f} s and never signalled")


if __name__ == "__main__":
    epoch, step, fd, *args = sys.argv[1:]
    register_step_hook(PausePoint(int(epoch), int(step), int(fd)))
    sys.exit(main(args))
