"""torch.distributed for zs-eval under `torchrun`: one process per device, images sharded by rank."""

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.teacher import resolve_device


@dataclass(frozen=True)
class Process:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> Sequence:
        """This process's items: every world_size-th from its rank on (no padding, no repeats)."""
        return items[self.rank :: self.world_size]


def start(device: str) -> Process:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU;
    with --device auto each process takes cuda:LOCAL_RANK when there are GPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Process(0, 1, resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return Process(dist.get_rank(), dist.get_world_size(), resolved)


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
