"""Multi-process training through ``torchrun``: process group setup, sums across ranks, broadcasting state.

Single-process runs never touch ``torch.distributed``: every helper is the identity there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":  # one GPU per rank, chosen before NCCL starts
        torch.cuda.set_device(rank_device(device, info))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """A CUDA rank's own GPU: ``cuda:LOCAL_RANK`` (unless the device names an index); other devices as given."""
    if device.type != "cuda" or not info.enabled or device.index is not None:
        return device
    return torch.device("cuda", info.local_rank)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers across ranks (identity in a single process)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_state(model: nn.Module) -> None:
    """Give every rank rank 0's full state dict, extra state (calibration flags) included."""
    if not active():
        return
    holder = [model.state_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    if dist.get_rank() != 0:
        model.load_state_dict(holder[0])


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers: each rank updates its BatchNorm running statistics from its own batches
    (DDP syncs parameters, not those), so without this the ranks evaluate slightly different models."""
    if not active():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def barrier() -> None:
    if active():
        dist.barrier()
