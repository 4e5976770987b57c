"""MAE's per-sample random masking of patch tokens."""

from typing import NamedTuple

import torch


class MaskedTokens(NamedTuple):
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
