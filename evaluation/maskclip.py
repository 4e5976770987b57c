"""MaskCLIP (Zhou et al., ECCV 2022): dense CLIP features without training, the baseline of `--model maskclip`.

The CLIP image tower runs as usual up to its last block. There, instead of attention, each token
keeps its own value: v = out_proj(value_projection(ln_1(x))) (the attention mixing skipped, as if
every token attended only to itself), then the block's residual and MLP (x + v, then
+ mlp(ln_2(x + v))), then ln_post and the visual projection `proj`, for every patch token. These
[B, h*w, D] features live in CLIP's joint space and are compared with the class text embeddings.
The positional embedding is resized bicubically to the input's token grid, so any size whose sides
are multiples of the patch size works.
"""

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from zeroseg.pipeline.errors import UserError


def check_maskclip_tower(visual: nn.Module) -> None:
    """UserError unless `visual` is an open_clip ViT whose blocks use nn.MultiheadAttention."""
    if not isinstance(visual, VisionTransformer):
        raise UserError(f"MaskCLIP needs a ViT CLIP image tower; this teacher has a {type(visual).__name__}")
    last = visual.transformer.resblocks[-1]
    if not isinstance(last, ResidualAttentionBlock) or not last.attn._qkv_same_embed_dim:
        raise UserError("MaskCLIP needs open_clip's standard attention blocks (no custom attention)")
    if getattr(visual, "attn_pool", None) is not None or not getattr(visual.transformer, "batch_first", True):
        raise UserError("MaskCLIP needs a ViT with a class token and no attentional pooling")


def resized_positional_embedding(visual: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    """[1 + h*w, width]: the class position, then the patch positions resized bicubically to `grid`."""
    embedding = visual.positional_embedding  # [1 + h0*w0, width]
    base = tuple(visual.grid_size)
    if tuple(grid) == base:
        return embedding
    patches = embedding[1:].reshape(1, *base, -1).permute(0, 3, 1, 2)  # [1, width, h0, w0]
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([embedding[:1], patches.flatten(2)[0].T])


def maskclip_features(visual: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """images [B, 3, H, W] normalised (H, W multiples of the patch size) -> ([B, h*w, D], (h, w)),
    patch tokens in row-major order, D the CLIP embedding dim (not normalised)."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # [B, width, h, w]
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)  # [B, h*w, width]
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + resized_positional_embedding(visual, grid).to(x.dtype)  # [B, 1+h*w, width]
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    x = _value_path(blocks[-1], x)[:, 1:]  # [B, h*w, width]
    return visual.ln_post(x) @ visual.proj, grid


def _value_path(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The last block with each token's attention replaced by its own value."""
    width = x.shape[-1]
    attention = block.attn
    bias = attention.in_proj_bias[2 * width :] if attention.in_proj_bias is not None else None
    values = F.linear(block.ln_1(x), attention.in_proj_weight[2 * width :], bias)  # [B, N, width]
    x = x + block.ls_1(attention.out_proj(values))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
