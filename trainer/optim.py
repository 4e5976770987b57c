"""AdamW over the student with MAE's parameter groups: weight decay on weight matrices only."""

import torch
from torch import nn

from zeroseg.trainer.config import OptimConfig

NO_DECAY_NAMES = ("mask_token", "group_tokens")  # learned tokens; the positional embeddings are fixed buffers


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight matrices with `weight_decay`; biases, norm weights and learned tokens without."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the configured betas; the lr is set before every step by the schedule."""
    groups = param_groups(model, optim.weight_decay)
    return torch.optim.AdamW(groups, lr=0.0, betas=optim.betas, fused=device.type == "cuda")
