"""AdamW over the student with MAE's and GroupViT's parameter groups: weight decay on every parameter of
2 or more dimensions (the mask token and the group tokens included, as timm's add_weight_decay does);
none on biases and norm weights. optim.decay_tokens = false exempts the learned tokens as well."""

import torch
from torch import nn

from zeroseg.trainer.config import OptimConfig

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


def make_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the configured betas; the lr is set before every step by the schedule."""
    groups = param_groups(model, optim.weight_decay, optim.decay_tokens)
    return torch.optim.AdamW(groups, lr=0.0, betas=optim.betas, fused=device.type == "cuda")
