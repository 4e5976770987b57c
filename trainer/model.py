"""The ZeroSeg student: a masked ViT encoder with a reconstruction decoder and a grouping segmentation head.

images (B, 3, H, W)
  -> patch embed + sin-cos pos embed -> random masking (training) -> encoder blocks -> latent
  latent -> decoder (mask tokens, sin-cos pos embed, blocks) -> pred: pixels of every patch
  latent -> segmentation head (blocks, grouping 32, blocks, grouping 8, blocks) -> 8 segment tokens
  segment tokens -> MLP -> g (B, 8, D_teacher)
  segment tokens -> transformer layer -> average pool -> MLP -> z (B, D_teacher)
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from zeroseg.trainer.grouping import GroupingStage
from zeroseg.trainer.model_config import ModelConfig
from zeroseg.trainer.vit import Block, Mlp, PatchEmbed, interpolate_pos_embed, layer_norm, sincos_pos_embed_2d


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C), patches in raster order, pixels (row, col, channel)."""
    batch, chans, height, width = images.shape
    p = patch_size
    rows, cols = height // p, width // p
    x = images.reshape(batch, chans, rows, p, cols, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (B, rows, cols, p, p, C)
    return x.reshape(batch, rows * cols, p * p * chans)


class MaskedTokens(NamedTuple):
    """What MAE's per-sample random masking (random_masking) gives."""

    kept: torch.Tensor  # (B, keep, D) visible tokens, in shuffled order
    mask: torch.Tensor  # (B, L) 1 = removed, 0 = kept, in raster order
    ids_keep: torch.Tensor  # (B, keep) raster index of each kept token
    ids_restore: torch.Tensor  # (B, L) gather index that puts shuffled order back into raster order


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """Tokens a sample keeps: int(L * (1 - ratio)), as MAE."""
    return int(num_tokens * (1 - mask_ratio))


def random_masking(
    tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> MaskedTokens:
    """Keep a random int(L * (1 - ratio)) tokens of each sample (B, L, D).

    noise ~ U[0, 1] (B, L); ids_shuffle = argsort(noise) (ascending: small noise is kept);
    ids_restore = argsort(ids_shuffle). `generator` (on tokens' device) makes the draw reproducible.
    """
    batch, length, dim = tokens.shape
    keep = num_kept(length, mask_ratio)
    if not 0 < keep <= length:
        raise ValueError(f"mask_ratio {mask_ratio} keeps {keep} of {length} tokens")

    noise = torch.rand(batch, length, device=tokens.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(tokens, 1, ids_keep[:, :, None].expand(-1, -1, dim))

    # built in shuffled order (first `keep` visible), then un-shuffled to raster order
    mask = torch.ones(batch, length, device=tokens.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return MaskedTokens(kept, mask, ids_keep, ids_restore)


@dataclass
class ZeroSegOutput:
    """What one forward pass gives.

    g: (B, G, D_teacher) segment embeddings, G = the last stage's group tokens (8).
    z: (B, D_teacher) global image embedding.
    pred: (B, L, p * p * C) predicted pixels of every patch (raster order), None when no patch was masked.
    mask: (B, L) 1 = patch removed from the encoder's input, 0 = seen; L = rows * cols.
    soft_assignments / hard_assignments: one (B, N_in, G_out) map per grouping stage. Stage 1's rows are
        the tokens the head saw: all L patches in raster order when nothing is masked, else the
        visible patches in `ids_keep` order. Stage k > 1's rows are stage k-1's groups. Soft maps are
        the noise-free softmax over groups (rows sum to 1); hard maps are one-hot in value.
    ids_keep: (B, N_seen) raster index of each token the encoder and the head saw.
    grid_size: (rows, cols) of the patch grid of this input.
    """

    g: torch.Tensor
    z: torch.Tensor
    pred: torch.Tensor | None
    mask: torch.Tensor
    soft_assignments: list[torch.Tensor]
    hard_assignments: list[torch.Tensor]
    ids_keep: torch.Tensor
    grid_size: tuple[int, int]


class ZeroSeg(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.base_grid = (cfg.grid_size, cfg.grid_size)

        # encoder: sees the visible patches (all of them at test time)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(cfg.embed_dim, self.base_grid)[None], persistent=False
        )  # (1, L, D)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = layer_norm(cfg.embed_dim)

        # reconstruction decoder: predicts the pixels of every patch
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed",
            sincos_pos_embed_2d(cfg.decoder_embed_dim, self.base_grid)[None],
            persistent=False,
        )  # (1, L, D_dec)
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = layer_norm(cfg.decoder_embed_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_size**2 * cfg.in_chans)

        # segmentation head: grouping stages, then the layers over the final segment tokens
        self.seg_embed = nn.Linear(cfg.embed_dim, cfg.seg_embed_dim)
        prev_groups = (None, *cfg.num_group_tokens[:-1])
        self.grouping_stages = nn.ModuleList(
            GroupingStage(
                cfg.seg_embed_dim, cfg.seg_num_heads, depth, groups, prev, cfg.mlp_ratio, cfg.gumbel_tau
            )
            for depth, groups, prev in zip(
                cfg.seg_depths[:-1], cfg.num_group_tokens, prev_groups, strict=True
            )
        )
        self.segment_blocks = nn.ModuleList(
            Block(cfg.seg_embed_dim, cfg.seg_num_heads, cfg.mlp_ratio) for _ in range(cfg.seg_depths[-1])
        )
        self.seg_norm = layer_norm(cfg.seg_embed_dim)

        # projections into the teacher's space: per segment (g) and global (z)
        self.segment_proj = Mlp(cfg.seg_embed_dim, cfg.proj_hidden_dim, cfg.teacher_dim)
        self.global_block = Block(cfg.seg_embed_dim, cfg.seg_num_heads, cfg.mlp_ratio)
        self.global_norm = layer_norm(cfg.seg_embed_dim)
        self.global_proj = Mlp(cfg.seg_embed_dim, cfg.proj_hidden_dim, cfg.teacher_dim)

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's init: xavier-uniform linears (and the patch projection as a linear), zero biases,
        LayerNorm 1/0, mask token normal(0.02). Group tokens are set by their stages."""
        self.apply(_init_module)
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(
        self, images: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """-> (latent (B, N_seen, D), mask (B, L), ids_keep (B, N_seen), ids_restore (B, L) or None, grid)."""
        grid = self.patch_embed.grid_size(images.shape[-2], images.shape[-1])
        x = self.patch_embed(images)  # (B, L, D)
        x = x + interpolate_pos_embed(self.pos_embed, self.base_grid, grid).to(x.dtype)
        batch, length, _ = x.shape

        if num_kept(length, mask_ratio) < length:
            x, mask, ids_keep, ids_restore = random_masking(x, mask_ratio, generator)  # x: (B, N_seen, D)
        else:
            mask = torch.zeros(batch, length, device=x.device)
            ids_keep = torch.arange(length, device=x.device).expand(batch, -1)
            ids_restore = None

        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_keep, ids_restore, grid

    def forward_decoder(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """latent (B, N_seen, D) -> predicted pixels (B, L, p * p * C), raster order."""
        x = self.decoder_embed(latent)  # (B, N_seen, D_dec)
        batch, seen, dim = x.shape
        mask_tokens = self.mask_token.expand(batch, ids_restore.shape[1] - seen, -1)
        x = torch.cat([x, mask_tokens], dim=1)  # (B, L, D_dec), shuffled order
        x = torch.gather(x, 1, ids_restore[:, :, None].expand(-1, -1, dim))  # raster order
        x = x + interpolate_pos_embed(self.decoder_pos_embed, self.base_grid, grid).to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_segmentation(
        self, latent: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """latent (B, N_seen, D) -> (segment tokens (B, G, C_seg), hard maps, soft maps)."""
        x = self.seg_embed(latent)  # (B, N_seen, C_seg)
        group_tokens = None
        hard_maps, soft_maps = [], []
        for stage in self.grouping_stages:
            x, group_tokens, hard, soft = stage(x, group_tokens, generator)  # x: (B, G_stage, C_seg)
            hard_maps.append(hard)
            soft_maps.append(soft)
        for block in self.segment_blocks:
            x = block(x)
        return self.seg_norm(x), hard_maps, soft_maps

    def forward_global(self, segments: torch.Tensor) -> torch.Tensor:
        """segment tokens (B, G, C_seg) -> z (B, D_teacher)."""
        x = self.global_norm(self.global_block(segments))
        return self.global_proj(x.mean(dim=1))

    def forward(
        self,
        images: torch.Tensor,
        mask_ratio: float | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> ZeroSegOutput:
        """images: (B, C, H, W) normalised, H and W multiples of the patch size.
        mask_ratio: None = the config's ratio in training mode, 0 (every patch) in eval mode.
        generator: draws the masking and the Gumbel noise, for reproducible training steps."""
        if mask_ratio is None:
            mask_ratio = self.cfg.mask_ratio if self.training else 0.0
        latent, mask, ids_keep, ids_restore, grid = self.forward_encoder(images, mask_ratio, generator)
        pred = None if ids_restore is None else self.forward_decoder(latent, ids_restore, grid)
        segments, hard_maps, soft_maps = self.forward_segmentation(latent, generator)
        return ZeroSegOutput(
            g=self.segment_proj(segments),
            z=self.forward_global(segments),
            pred=pred,
            mask=mask,
            soft_assignments=soft_maps,
            hard_assignments=hard_maps,
            ids_keep=ids_keep,
            grid_size=grid,
        )


def _init_module(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
