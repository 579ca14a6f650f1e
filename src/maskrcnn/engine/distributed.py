"""Multi-process training on PyTorch's own machinery: ``torchrun`` sets the environment,
``torch.distributed`` (gloo on CPU, nccl on GPU) does the communication."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 300.0) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a no-op for a single process. The timeout bounds
    every collective: a rank that died makes the others fail instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return info


def device_for(info: DistInfo, requested: str) -> torch.device:
    """``auto``: this rank's GPU when there are GPUs, else the CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank if info.enabled else 0)
        return torch.device("cpu")
    return torch.device(requested)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` for one process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_ranks_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Whether ``flag`` holds in every process (just ``flag`` for one process)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
