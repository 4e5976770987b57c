"""Vision-transformer parts: patch embedding, pre-norm transformer block, fixed 2-D sin-cos positional
embedding and its interpolation to other token grids."""

import torch
import torch.nn.functional as F
from torch import nn


def layer_norm(dim: int) -> nn.LayerNorm:
    """The LayerNorm used throughout (MAE's eps)."""
    return nn.LayerNorm(dim, eps=1e-6)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # (B, N, 3D) -> (3, B, heads, N, D/heads)
        qkv = (
            self.qkv(x)
            .reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        # (B, heads, N, D/heads) -> (B, N, D)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches, linearly embedded: (B, C, H, W) -> (B, H/p * W/p, D), raster order."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of patches for an input of height x width; both must be multiples of the patch."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input size {height}x{width} is not a multiple of the patch size {p}")
        return height // p, width // p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.grid_size(images.shape[-2], images.shape[-1])  # raises unless H and W are multiples of p
        # (B, D, H/p, W/p) -> (B, H/p * W/p, D)
        return self.proj(images).flatten(2).transpose(1, 2)


def sincos_pos_embed_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of 1-D positions (M,) -> (M, dim): [sin(pos * w_k), cos(pos * w_k)],
    w_k = 1 / 10000^(k / (dim/2)), k = 0..dim/2-1."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding of a rows x cols token grid in raster order: (rows * cols, dim),
    float32. The first dim/2 channels encode the column, the last dim/2 the row (MAE's layout)."""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be a multiple of 4")
    rows, cols = grid_size
    row_ids, col_ids = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")  # (rows, cols)
    embed_col = sincos_pos_embed_1d(dim // 2, col_ids.flatten())
    embed_row = sincos_pos_embed_1d(dim // 2, row_ids.flatten())
    return torch.cat([embed_col, embed_row], dim=1).float()


def interpolate_pos_embed(
    pos_embed: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize a positional embedding (1, src_rows * src_cols, D) for a dst_rows x dst_cols token grid
    (bicubic, align_corners=False, so the new grid spans the same image area); (1, dst_rows * dst_cols, D).
    The same grid returns the input itself."""
    if tuple(src_grid) == tuple(dst_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    # (1, L, D) -> (1, D, rows, cols)
    grid = pos_embed.reshape(1, src_grid[0], src_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(dst_grid), mode="bicubic", align_corners=False)
    # (1, D, rows', cols') -> (1, L', D)
    return grid.permute(0, 2, 3, 1).reshape(1, dst_grid[0] * dst_grid[1], dim).to(pos_embed.dtype)
