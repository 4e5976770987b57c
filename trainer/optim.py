"""Optimisation: AdamW over the student with MAE's and GroupViT's parameter groups, and the run's length and
learning rate.

Parameter groups: weight decay on every parameter of 2 or more dimensions (the mask token and the group tokens
included, as timm's add_weight_decay does); none on biases and norm weights. optim.decay_tokens = false exempts
the learned tokens as well.

Schedule: MAE's linear warm-up then half-cycle cosine, the lr set before every optimizer step; the peak lr is
base_lr * effective batch / 256 (MAE's scaling rule) unless optim.lr is given.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from zeroseg.errors import UserError
from zeroseg.trainer.config import OptimConfig, ScheduleConfig

TOKEN_NAMES = ("mask_token", "group_tokens")  # learned tokens; the positional embeddings are fixed buffers


def decay_split(model: nn.Module, decay_tokens: bool = True) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters (decayed, not decayed)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        token = name.rsplit(".", 1)[-1] in TOKEN_NAMES
        (no_decay if param.ndim <= 1 or (token and not decay_tokens) else decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float, decay_tokens: bool = True) -> list[dict]:
    """Two groups: the decayed parameters of `decay_split` with `weight_decay`, the others without."""
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model, decay_tokens)
    return [
        {"params": [params[name] for name in decay], "weight_decay": weight_decay},
        {"params": [params[name] for name in no_decay], "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with the configured betas; the lr is set before every step by the schedule. Fused on every device:
    its found_inf (a 0-dim float tensor set as the optimizer's attribute) skips a step on the device."""
    groups = param_groups(model, optim.weight_decay, optim.decay_tokens)
    return torch.optim.AdamW(groups, lr=0.0, betas=optim.betas, fused=True)


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
