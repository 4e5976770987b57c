"""GroupViT-style grouping: group tokens gather image tokens into segments by hard assignment.

A `GroupingStage` runs transformer blocks over [tokens, group tokens], then its `GroupingBlock`
assigns every token to exactly one group (Gumbel-softmax in training, argmax at test, both with a
straight-through gradient) and returns one new token per group.
"""

import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.trainer.vit import Block, Mlp, layer_norm


def straight_through(soft: torch.Tensor, dim: int) -> torch.Tensor:
    """One-hot of argmax along `dim` in the forward pass, gradient of `soft` in the backward pass."""
    index = soft.argmax(dim=dim, keepdim=True)
    hard = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    return hard - soft.detach() + soft


def gumbel_from_uniform(uniform: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)) in float32, u clamped to [tiny, 1 - eps] so that no log(0)
    can occur (GroupViT draws it this way on purpose: exponential_ can return 0, pytorch issue 41663)."""
    finfo = torch.finfo(torch.float32)
    return -(-uniform.float().clamp(finfo.tiny, 1.0 - finfo.eps).log()).log()


def gumbel_noise(
    shape: torch.Size, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """float32 Gumbel noise of `shape` from `generator` (uniform draws, `gumbel_from_uniform`)."""
    return gumbel_from_uniform(torch.rand(shape, dtype=torch.float32, device=device, generator=generator))


def gumbel_straight_through(
    logits: torch.Tensor, tau: float, dim: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Hard Gumbel-softmax: one-hot of argmax(softmax((logits + gumbel) / tau)) with its gradient,
    computed in float32 outside autocast, returned in the logits' dtype."""
    with torch.autocast(logits.device.type, enabled=False):
        noisy = (logits.float() + gumbel_noise(logits.shape, logits.device, generator)) / tau
        return straight_through(noisy.softmax(dim=dim), dim).to(logits.dtype)


class TokenMixer(nn.Module):
    """MLP along the token axis: (B, N_in, C) -> (B, N_out, C), each channel mixed across tokens."""

    def __init__(self, num_in: int, hidden: int, num_out: int):
        super().__init__()
        self.mlp = Mlp(num_in, hidden, num_out)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens.transpose(1, 2)).transpose(1, 2)


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, G, C) over keys/values (B, N, C)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        batch, groups, dim = query.shape
        head_dim = dim // self.num_heads
        q = self.q(query).reshape(batch, groups, self.num_heads, head_dim).transpose(1, 2)  # (B, h, G, C/h)
        # (B, N, 2C) -> (2, B, h, N, C/h)
        kv = self.kv(key).reshape(batch, key.shape[1], 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.proj(out.transpose(1, 2).reshape(batch, groups, dim))


class CrossAttentionBlock(nn.Module):
    """Groups updated from the tokens: g + attn(g, x), g + mlp(norm(g)), then a norm.

    GroupViT's CrossAttnBlock(post_norm=True): no norm on the query and key inputs, which the grouping
    block has already normalised.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.attn = CrossAttention(dim, num_heads)
        self.norm_mlp = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_out = layer_norm(dim)

    def forward(self, groups: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        groups = groups + self.attn(groups, tokens)
        groups = groups + self.mlp(self.norm_mlp(groups))
        return self.norm_out(groups)


class AssignAttention(nn.Module):
    """Single-head assignment of tokens to groups; each group becomes the mean of its tokens' values.

    logits (B, G, N) are softmaxed over the GROUP axis, so every token picks one group. The hard
    assignment is divided by (its sum over tokens + 1) before it averages the values.
    """

    def __init__(self, dim: int, gumbel_tau: float):
        super().__init__()
        self.gumbel_tau = gumbel_tau
        self.scale = dim**-0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, groups: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """groups (B, G, C), tokens (B, N, C) -> (merged (B, G, C), hard (B, N, G), soft (B, N, G))."""
        logits = self.q_proj(groups) @ self.k_proj(tokens).transpose(1, 2) * self.scale  # (B, G, N)
        soft = logits.softmax(dim=1)
        if self.training:
            hard = gumbel_straight_through(logits, self.gumbel_tau, dim=1, generator=generator)
        else:
            hard = straight_through(soft, dim=1)
        weights = hard / (hard.sum(dim=2, keepdim=True) + 1.0)  # (B, G, N)
        merged = self.proj(weights @ self.v_proj(tokens))  # (B, G, C)
        return merged, hard.transpose(1, 2), soft.transpose(1, 2)


class GroupingBlock(nn.Module):
    """Merge N tokens into `num_output_groups` segment tokens.

    group tokens (B, G_in, C) --norm, token MLP G_in -> G_out, norm--> groups (B, G_out, C)
    --cross-attention over the normed tokens--> groups --hard assignment--> merged
    segments = merged + groups, then segments + mlp(norm(segments)).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_group_tokens: int,
        num_output_groups: int,
        mlp_ratio: float,
        gumbel_tau: float,
    ):
        super().__init__()
        self.norm_groups = layer_norm(dim)
        self.norm_tokens = layer_norm(dim)
        self.token_mixer = TokenMixer(num_group_tokens, dim // 2, num_output_groups)
        self.norm_mixed = layer_norm(dim)
        self.pre_assign_attn = CrossAttentionBlock(dim, num_heads, mlp_ratio)
        self.assign = AssignAttention(dim, gumbel_tau)
        self.norm_segments = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, tokens: torch.Tensor, group_tokens: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (B, N, C), group tokens (B, G_in, C) ->
        (segments (B, G_out, C), hard assignment (B, N, G_out), soft assignment (B, N, G_out))."""
        tokens = self.norm_tokens(tokens)
        groups = self.norm_mixed(self.token_mixer(self.norm_groups(group_tokens)))
        groups = self.pre_assign_attn(groups, tokens)
        merged, hard, soft = self.assign(groups, tokens, generator)
        segments = merged + groups
        segments = segments + self.mlp(self.norm_segments(segments))
        return segments, hard, soft


class GroupingStage(nn.Module):
    """Transformer blocks over [tokens, group tokens], then a grouping block into one token per group.

    The first stage's group tokens are learned parameters (normal, std 0.02). A later stage's start at
    zero plus a token-axis MLP projection of the previous stage's group tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int,
        num_group_tokens: int,
        num_prev_group_tokens: int | None,
        mlp_ratio: float,
        gumbel_tau: float,
    ):
        super().__init__()
        self.group_tokens = nn.Parameter(torch.zeros(1, num_group_tokens, dim))
        if num_prev_group_tokens is None:
            nn.init.normal_(self.group_tokens, std=0.02)
            self.group_projector = None
        else:
            self.group_projector = nn.Sequential(
                layer_norm(dim), TokenMixer(num_prev_group_tokens, dim // 2, num_group_tokens)
            )
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.grouping = GroupingBlock(
            dim, num_heads, num_group_tokens, num_group_tokens, mlp_ratio, gumbel_tau
        )

    def forward(
        self,
        tokens: torch.Tensor,
        prev_group_tokens: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (B, N, C) -> (segments (B, G, C), group tokens after the blocks (B, G, C),
        hard (B, N, G), soft (B, N, G))."""
        num_groups = self.group_tokens.shape[1]
        group_tokens = self.group_tokens.expand(tokens.shape[0], -1, -1)
        if self.group_projector is not None:
            group_tokens = group_tokens + self.group_projector(prev_group_tokens)
        x = torch.cat([tokens, group_tokens], dim=1)  # (B, N + G, C)
        for block in self.blocks:
            x = block(x)
        tokens, group_tokens = x[:, :-num_groups], x[:, -num_groups:]
        segments, hard, soft = self.grouping(tokens, group_tokens, generator)
        return segments, group_tokens, hard, soft
