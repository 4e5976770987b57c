"""Stopping on a scheduler's signal: SIGTERM (SLURM, Kubernetes) or SIGUSR1 (SLURM's --signal) asks the
run to finish its current step, write a checkpoint and exit, so `--resume` loses nothing."""

import signal

import torch
import torch.distributed as dist

from zeroseg.process_group import Process

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
        self.signal = number

    def agreed(self, process: Process) -> bool:
        """True on every process once any of them was signalled (one all-reduce per call when distributed)."""
        if not process.distributed:
            return self.signal is not None
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=process.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
