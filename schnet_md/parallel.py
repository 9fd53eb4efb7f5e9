"""Data-parallel training across processes (torchrun, srun): who am I, and the few collectives training needs.

Launched by torchrun (or `schnet-md train --nproc N`, which calls it), every process sees RANK, WORLD_SIZE and
LOCAL_RANK; under SLURM's srun without torchrun, SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID stand in (with
MASTER_ADDR and MASTER_PORT set by the job script). gloo carries the collectives on CPU, NCCL on CUDA. Every
collective has a timeout (SCHNET_MD_DIST_TIMEOUT seconds, default 600), so a rank that dies ends the job with
an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def main_process() -> bool:
    """Whether this process writes the run's files: rank 0 of a launched group, or a process on its own. Known
    from the launcher's environment, before the group is joined (the run folder is locked first)."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1) <= 1 or _env_int("RANK", "SLURM_PROCID", default=0) == 0


def setup(device: torch.device) -> Group:
    """Join the process group if this process was launched as one of several; a no-op otherwise."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    if world <= 1:
        return Group()
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("SCHNET_MD_DIST_TIMEOUT", "600")))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    return Group(rank, world, local_rank)


def shutdown(group: Group) -> None:
    if group.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(group: Group, values: torch.Tensor) -> torch.Tensor:
    if group.active:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_from_main(group: Group, tensor: torch.Tensor) -> None:
    if group.active:
        dist.broadcast(tensor, src=0)


def barrier(group: Group) -> None:
    if group.active:
        dist.barrier()
