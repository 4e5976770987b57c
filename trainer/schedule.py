"""Run length and learning rate: MAE's linear warm-up then half-cycle cosine, set before every optimizer step."""

import math
from dataclasses import dataclass

from zeroseg.errors import UserError
from zeroseg.trainer.config import OptimConfig, ScheduleConfig


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float

    def lr(self, step: int) -> float:
        """lr of optimizer step `step` (0-based): peak * step / warmup during warm-up (0 at step 0), then
        min_lr + (peak - min_lr) * (1 + cos(pi * progress)) / 2 with progress 0 -> 1 over the other steps."""
        if step < self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_lr(optim: OptimConfig, effective_batch: int) -> float:
    """optim.lr when set, else base_lr * effective batch / 256 (MAE's scaling rule)."""
    return optim.lr if optim.lr is not None else optim.base_lr * effective_batch / 256


def make_schedule(schedule: ScheduleConfig, optim: OptimConfig, num_samples: int, effective_batch: int) -> Schedule:
    """Steps from epochs (one epoch = num_samples images) unless given in steps; UserError when the warm-up
    does not end before the run does."""
    steps_per_epoch = num_samples / effective_batch
    total = schedule.steps if schedule.steps is not None else max(1, math.ceil(schedule.epochs * steps_per_epoch))
    if schedule.warmup_steps is not None:
        warmup = schedule.warmup_steps
    else:
        warmup = round(schedule.warmup_epochs * steps_per_epoch)
    if warmup >= total and warmup > 0:
        raise UserError(
            f"the warm-up ({warmup} steps) does not end before the run ({total} steps): "
            f"set schedule.warmup_steps or schedule.warmup_epochs lower"
        )
    return Schedule(total, warmup, peak_lr(optim, effective_batch), schedule.min_lr)
