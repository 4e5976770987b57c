"""torch.distributed for `torchrun`: NCCL on GPUs, gloo on the CPU; a plain single process otherwise; and how the
processes stop together on a scheduler's signal.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process it starts.
Shutdown order matters on gloo: the caller drops the DDP model and the optimizer and runs the garbage
collector before `shutdown` destroys the process group (destroying it first aborts at exit in about one
run in six).

Stopping: SIGTERM (SLURM, Kubernetes), SIGUSR1 (SLURM's --signal) or SIGINT (Ctrl-C) asks a run to finish its
current step, write a checkpoint and exit, so `--resume` loses nothing (`StopRequest`); a second Ctrl-C stops at once
(KeyboardInterrupt, no checkpoint). Loader workers ignore these signals.
"""

import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zeroseg.runtime import resolve_device

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@dataclass(frozen=True)
class Process:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence) -> Sequence:
        """This process's items: every world_size-th from its rank on (no padding, no repeats)."""
        return items[self.rank :: self.world_size]


def env_rank() -> int:
    """This process's rank under torchrun (0 for a plain process); readable before `setup`."""
    return int(os.environ.get("RANK", 0))


def setup(device_name: str) -> Process:
    """Join the torchrun process group when there is one and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank, world_size)
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return Process(env_rank(), world_size, local_rank, device)


def shutdown(process: Process) -> None:
    """Leave the process group (after the caller has dropped the DDP model and the optimizer)."""
    if process.distributed and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_processes(values: torch.Tensor, process: Process) -> torch.Tensor:
    """The element-wise mean of `values` over all processes (the tensor itself in a single process)."""
    if process.distributed:
        values = values.clone()
        dist.all_reduce(values)
        values /= process.world_size
    return values


def barrier(process: Process) -> None:
    if process.distributed:
        dist.barrier()


class StopRequest:
    """Records a stop signal; every process agrees on stopping after the same step."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for number in STOP_SIGNALS:
            self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _record(self, number: int, frame) -> None:
        if number == signal.SIGINT and self.signal == signal.SIGINT:  # Ctrl-C twice: the user will not wait
            raise KeyboardInterrupt
        self.signal = number

    def agreed(self, process: Process) -> bool:
        """True on every process once any of them was signalled (one all-reduce per call when distributed)."""
        if not process.distributed:
            return self.signal is not None
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=process.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
