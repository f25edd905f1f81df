"""Run by tests/test_train.py under torchrun: ``asqpost train``, with every rank recording what it did.

``python -m torch.distributed.run ... ddp_rank_probe.py RECORD_DIR train ...`` runs the CLI's ``train``; when it
returns, every rank writes ``RECORD_DIR/rank<r>.pt``: the optimizer steps it took in each epoch (counted by an
optimizer step hook) and the tensors of the model it ended with.
"""

import os
import sys
from pathlib import Path

import torch

from asqpost.cli import main
from asqpost.train import run


class Recorder:
    def __init__(self, train_one_epoch):
        self.train_one_epoch = train_one_epoch
        self.steps_per_epoch: list[int] = []
        self.model = None

    def __call__(self, model, batches, optimizer, *args, **kwargs):
        self.model = getattr(model, "module", model)  # unwrap DistributedDataParallel
        self.steps_per_epoch.append(0)
        hook = optimizer.register_step_post_hook(self._count)
        try:
            return self.train_one_epoch(model, batches, optimizer, *args, **kwargs)
        finally:
            hook.remove()

    def _count(self, *_):
        self.steps_per_epoch[-1] += 1

    def save(self, path: Path) -> None:
        tensors = {k: v for k, v in self.model.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save({"steps_per_epoch": self.steps_per_epoch, "state_dict": tensors}, path)


if __name__ == "__main__":
    recorder = run.train_one_epoch = Recorder(run.train_one_epoch)
    code = main(sys.argv[2:])
    recorder.save(Path(sys.argv[1]) / f"rank{os.environ['RANK']}.pt")
    sys.exit(code)
