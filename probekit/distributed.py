"""Several processes with PyTorch's own engine: `torchrun` (or `srun torchrun`) sets the
environment, probekit joins the process group (gloo on CPUs; gloo and nccl with GPUs) and
splits work by store chunks. One process is a group of one: rank 0 of 1, collectives that
return their input, so callers never test for absence."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["SINGLE", "Dist", "current", "init"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the group, and the collectives probekit uses."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_group(self) -> bool:
        """More than one process (a torchrun job)."""
        return self.world > 1

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world): this process takes every world-th piece of work from `rank`."""
        return self.rank, self.world

    def barrier(self) -> None:
        if not self.is_group:
            return
        import torch.distributed

        torch.distributed.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable, host side), in rank order, on every rank."""
        if not self.is_group:
            return [obj]
        import torch.distributed

        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src`, on every rank."""
        if not self.is_group:
            return obj
        import torch.distributed

        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]


SINGLE = Dist()  # one process: rank 0 of 1


def init() -> Dist:
    """Join the process group `torchrun` describes (WORLD_SIZE > 1); `SINGLE` for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch  # only here: one process never pays for it

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dist = torch.distributed
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group(backend="cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group(backend="gloo")
    return Dist(rank, world, local)


def current() -> Dist:
    """The group this process already joined; `SINGLE` when it joined none."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    import torch.distributed

    return init() if torch.distributed.is_initialized() else SINGLE
