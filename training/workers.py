"""One process or torchrun's several: who trains which share of a batch, and who writes files."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Workers:
    """This process's place among torchrun's processes; one of one without torchrun.

    Every process draws the same batch order and augmentations for the whole batch and trains on its share of
    it; DDP averages the gradients, so the optimizer sees the same batch as one process would. Every process
    evaluates (the selection of the kept epoch stays identical everywhere); only the first writes files.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def share(self) -> slice:
        """This process's rows of a batch."""
        return slice(self.rank, None, self.world)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def from_main(self, value):
        """The first process's ``value``, on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def join_workers() -> Workers:
    """The process group torchrun's environment describes (NCCL on CUDA, else gloo); one worker without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Workers()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    workers = Workers(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(workers.local_rank)
    return workers
