"""Training-free dense CLIP features: the image tower with its last block changed as a method of
evaluation.methods defines it (`--model maskclip`, `sclip`, `clearclip`, `naclip`).

The CLIP ViT runs unchanged up to its last block (positional embedding resized bicubically to the
input's token grid as SCLIP's code does, `resized_positional_embedding`; a remainder of the input that is
not a multiple of the patch is dropped by the patch convolution). The last block
computes the method's attention weights A from its own q, k (evaluation.methods has the formulas) and
Attn(A) = out_proj(heads of A @ v); ln_post and the visual projection `proj` then map every patch token
into CLIP's joint space -> [B, h*w, D], compared there with the class text embeddings.
"""

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from zeroseg.errors import UserError
from zeroseg.evaluation.methods import METHODS, TRAINING_FREE


def check_vit_tower(visual: nn.Module, method: str) -> None:
    """UserError unless `visual` is an open_clip ViT whose blocks use nn.MultiheadAttention."""
    if not isinstance(visual, VisionTransformer):
        raise UserError(f"--model {method} needs a ViT CLIP image tower; this teacher has a {type(visual).__name__}")
    last = visual.transformer.resblocks[-1]
    if not isinstance(last, ResidualAttentionBlock) or not last.attn._qkv_same_embed_dim:
        raise UserError(f"--model {method} needs open_clip's standard attention blocks (no custom attention)")
    if getattr(visual, "attn_pool", None) is not None or not getattr(visual.transformer, "batch_first", True):
        raise UserError(f"--model {method} needs a ViT with a class token and no attentional pooling")


def resized_positional_embedding(visual: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    """[1 + h*w, width]: the class position, then the patch positions resized bicubically as SCLIP, ClearCLIP
    and NACLIP do it: sampled with scale_factor (n + 0.1) / n0 per side (not resized to a target size: the
    bicubic samples sit at (i + 1/2) n0 / (n + 0.1) - 1/2), which gives floor(n + 0.1) = n positions."""
    embedding = visual.positional_embedding  # [1 + h0*w0, width]
    base = tuple(visual.grid_size)
    if tuple(grid) == base:
        return embedding
    patches = embedding[1:].reshape(1, *base, -1).permute(0, 3, 1, 2)  # [1, width, h0, w0]
    scale = ((grid[0] + 0.1) / base[0], (grid[1] + 0.1) / base[1])
    patches = F.interpolate(
        patches, scale_factor=scale, mode="bicubic", align_corners=False, recompute_scale_factor=False
    )  # [1, width, h, w]
    return torch.cat([embedding[:1], patches.flatten(2)[0].T])


def tokens_before_last_block(visual: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """images [B, 3, H, W] normalised -> (the last block's input [B, 1 + h*w, width], token grid (h, w))."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # [B, width, h, w]
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)  # [B, h*w, width]
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + resized_positional_embedding(visual, grid).to(x.dtype)  # [B, 1+h*w, width]
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x, grid


def dense_features(
    visual: VisionTransformer, images: torch.Tensor, method: str = "maskclip", gaussian_std: float | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """images [B, 3, H, W] normalised (H, W multiples of the patch size) -> ([B, h*w, D], (h, w)),
    patch tokens in row-major order, D the CLIP embedding dim (not normalised). gaussian_std None: the method's."""
    if method not in TRAINING_FREE:
        raise ValueError(f"unknown dense CLIP method '{method}' (choose from {', '.join(TRAINING_FREE)})")
    last_block, gaussian_std = METHODS[method].last_block, gaussian_std or METHODS[method].gaussian_std
    x, grid = tokens_before_last_block(visual, images)
    block = visual.transformer.resblocks[-1]
    if last_block.attention is None:
        attended = _value_path(block, block.ln_1(x))  # A = I
    else:
        q, k, v = head_projections(block, block.ln_1(x))  # each [B, heads, N, d]
        prior = None if gaussian_std is None else gaussian_prior(grid, gaussian_std).to(q)  # [N, N]
        attended = attend(block, last_block.attention(q, k, prior), v)
    x = _with_residual_and_mlp(block, x, attended) if last_block.residual_and_mlp else attended
    return visual.ln_post(x[:, 1:]) @ visual.proj, grid


def head_projections(block: ResidualAttentionBlock, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """y [B, N, width] -> q, k, v [B, heads, N, head_dim] from the block's packed in-projection."""
    attention = block.attn
    heads = attention.num_heads
    qkv = F.linear(y, attention.in_proj_weight, attention.in_proj_bias)  # [B, N, 3 * width]
    qkv = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)  # [3, B, heads, N, head_dim]
    return qkv[0], qkv[1], qkv[2]


def attend(block: ResidualAttentionBlock, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weights [B, heads, N, N], v [B, heads, N, head_dim] -> out_proj of the heads concatenated [B, N, width]."""
    mixed = (weights @ v).transpose(1, 2).flatten(2)  # [B, N, heads * head_dim]
    return block.attn.out_proj(mixed)


def gaussian_prior(grid: tuple[int, int], std: float) -> torch.Tensor:
    """[1 + h*w, 1 + h*w]: exp(-|pos_p - pos_p'|^2 / (2 std^2)) between patch positions (row, column) of
    the token grid, in patch units; 0 in the class token's row and column (NACLIP's neighbourhood prior)."""
    rows, cols = grid
    positions = torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).float()  # [h*w, 2] row-major
    prior = torch.exp(-torch.cdist(positions, positions).square() / (2 * std**2))  # [h*w, h*w]
    return F.pad(prior, (1, 0, 1, 0))


def _value_path(block: ResidualAttentionBlock, y: torch.Tensor) -> torch.Tensor:
    """Attn(I): each token's own value through out_proj, [B, N, width]."""
    width = y.shape[-1]
    attention = block.attn
    bias = attention.in_proj_bias[2 * width :] if attention.in_proj_bias is not None else None
    return attention.out_proj(F.linear(y, attention.in_proj_weight[2 * width :], bias))


def _with_residual_and_mlp(block: ResidualAttentionBlock, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    x = x + block.ls_1(attended)
    return x + block.ls_2(block.mlp(block.ln_2(x)))
