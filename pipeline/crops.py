"""Crop geometry shared by stage one and stage two: the centre crop and the grid views of it.

The trainer must see exactly the pixels the teacher saw, so both stages call `centre_crop` (on the
CPU, per image) and `grid_views` (on the teacher's device, per batch) from here.

Geometry, for a crop size S:
- centre crop: the centred square of side min(W, H) (left = (W - side) // 2, top = (H - side) // 2)
  resized to S x S with Pillow's antialiased bicubic filter. This equals "resize the short side to S,
  then centre-crop S x S" up to sub-pixel rounding, and costs the same for any aspect ratio.
- grid g: cell boundaries b_k = floor(k * S / g), k = 0..g, so cells differ by at most one pixel when
  g does not divide S (S=224, g=3: 0, 74, 149, 224 -> cells of 74, 75 and 75 pixels).
- view order: grid by grid in the order given, cells row-major; each cell is resized (bicubic,
  antialiased, clamped to 0..255) to the teacher's input size and normalised with its mean/std.

Decode (the store's preprocessing `decode`):
- full: the whole image is decoded, then cropped as above.
- reduced: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size inside the decoder (pipeline.images.decode_reduced)
  as far as its short side stays >= S, so the crop is never upsampled; the same centre square (in the full
  image's coordinates, mapped onto the reduced pixels) is resized to S x S. Other formats and images whose
  short side is under 2 S give the full decode's pixels exactly. Several times cheaper on large photos, at a
  small pixel difference from a full decode (benchmarks/decode_cost.py; numbers in docs/DESIGN.md).
- device: decode_jpeg on the stage's compute device, then the same centre square resized by torch
  (pipeline.device_decode).
"""

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from zeroseg.pipeline.images import decode_image, decode_reduced
from zeroseg.pipeline.store_meta import view_layout


def centre_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre square of a width x height image."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def centre_crop(image: Image.Image, size: int) -> np.ndarray:
    """The centre square of an RGB image resized to size x size: uint8 array (size, size, 3)."""
    crop = image.resize((size, size), Image.Resampling.BICUBIC, box=centre_box(*image.size))
    return np.array(crop, dtype=np.uint8)


def crop_from_bytes(
    data: bytes, size: int, max_pixels: int | None = None, decode: str = "full"
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode image bytes (at most max_pixels pixels; `decode` full or reduced) and centre-crop them:
    (crop (size, size, 3) uint8, (width, height) of the full image)."""
    if decode == "full":
        image = decode_image(data, max_pixels)
        return centre_crop(image, size), image.size
    if decode != "reduced":
        raise ValueError(f"crop_from_bytes decodes full or reduced, not '{decode}' (device: pipeline.device_decode)")
    reduced = decode_reduced(data, size, max_pixels)
    box = reduced.box(centre_box(*reduced.size))
    crop = reduced.image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return np.array(crop, dtype=np.uint8), reduced.size


def cell_boundaries(size: int, grid: int) -> list[int]:
    """Integer cell edges of a grid x grid split of `size` pixels: floor(k * size / grid)."""
    return [k * size // grid for k in range(grid + 1)]


def to_model_input(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) float pixels 0..255 -> (B, 3, size, size) normalised model input: resized (bicubic,
    antialiased, clamped to 0..255) when h, w differ from size; mean, std: (1, 3, 1, 1) in 0..255 units.
    The teacher's views and the student's images both go through here."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        images = images.clamp(0.0, 255.0)
    return (images - mean) / std


def channel_stats(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """A mean or std given in 0..1 units as a (1, 3, 1, 1) tensor in 0..255 units."""
    return torch.tensor(values, device=device).view(1, 3, 1, 1) * 255.0


def grid_views(
    crops: torch.Tensor,
    grids: Sequence[int],
    view_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """All grid views of a batch of crops, normalised for the teacher.

    crops: (B, S, S, 3) uint8, on the device where the views should be built.
    returns: (B, V, 3, view_size, view_size) in `dtype` (the teacher's: bfloat16 on CUDA), V = sum(g * g for g
    in grids). Each view is resized and normalised in float32 by to_model_input, as the student's images are
    (torch's CPU kernels have no bfloat16 antialiased bicubic), and rounded to `dtype` as it is written: the
    views equal the float32 views cast to `dtype`, and memory never holds all of them in float32.
    """
    batch, size = crops.shape[0], crops.shape[1]
    images = crops.permute(0, 3, 1, 2).float()  # (B, 3, S, S), 0..255
    mean_t, std_t = channel_stats(mean, crops.device), channel_stats(std, crops.device)
    layout = view_layout(grids)
    views = torch.empty(batch, len(layout), 3, view_size, view_size, dtype=dtype, device=crops.device)
    for index, (grid, r, c) in enumerate(layout):
        edges = cell_boundaries(size, grid)
        cell = images[:, :, edges[r] : edges[r + 1], edges[c] : edges[c + 1]]
        views[:, index] = to_model_input(cell, view_size, mean_t, std_t)
    return views
