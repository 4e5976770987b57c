"""Post-processing of the dense methods' score maps, each as its method's published code runs it.

PAMR (pixel-adaptive mask refinement, Araslanov & Roth, CVPR 2020; NACLIP runs it with 10 iterations and
dilations 8 and 16): with N the 8 neighbours of a pixel at each dilation d (offsets (dy, dx) * d, dy, dx in
{-1, 0, 1}, not both 0; outside the image the nearest border pixel), per image channel c
  sigma_c(p)  = the standard deviation (unbiased) of I_c over the 9 points of p's 3x3 neighbourhood at
                every dilation together (p itself counted once per dilation)
  a(p, n)     = softmax over n in N of mean_c( -|I_c(p) - I_c(n)| / (1e-8 + 0.1 sigma_c(p)) )
  M'(p)       = sum over n in N of a(p, n) M(n), repeated `steps` times, every channel of M alike.

Area filter (SCLIP's area_thd on VOC): a foreground class whose pixels are at most `threshold` of all
foreground pixels loses its scores (the pixels take their next best class).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

PAMR_DILATIONS = (8, 16)
_CHANNELS_AT_ONCE = 2  # PAMR's working set stays in cache (a 640x480 channel is 1.2 MB): 5x faster than all at once


def _neighbour_views(x: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """x [C, H, W] read at (row + dy, col + dx) for each offset, clamped to the border (replicate padding):
    views of one padded copy."""
    reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x[None], [reach] * 4, mode="replicate")[0]  # [C, H + 2 reach, W + 2 reach]
    rows, cols = x.shape[-2:]
    return [padded[:, reach + dy : reach + dy + rows, reach + dx : reach + dx + cols] for dy, dx in offsets]


def _offsets(dilations: Sequence[int], centre: bool) -> list[tuple[int, int]]:
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if centre or (dy, dx) != (0, 0)]
    return [(dy * d, dx * d) for d in dilations for dy, dx in steps]


def pamr(image: torch.Tensor, masks: torch.Tensor, steps: int, dilations: Sequence[int] = PAMR_DILATIONS):
    """image [3, H, W], masks [C, H, W] -> the refined masks [C, H, W] (module docstring)."""
    image = image.float()
    spread = torch.stack(_neighbour_views(image, _offsets(dilations, True))).std(dim=0)  # [3, H, W]
    neighbours = _offsets(dilations, False)
    affinity = torch.stack(
        [(-(image - view).abs() / (1e-8 + 0.1 * spread)).mean(dim=0) for view in _neighbour_views(image, neighbours)]
    ).softmax(dim=0)  # [P, H, W]
    refined = torch.empty_like(masks)
    for first in range(0, len(masks), _CHANNELS_AT_ONCE):  # channels are refined independently
        part = masks[first : first + _CHANNELS_AT_ONCE]  # [c, H, W]
        term = torch.empty_like(part)
        for _ in range(steps):
            total = torch.zeros_like(part)
            for weight, view in zip(affinity, _neighbour_views(part, neighbours)):
                total += torch.mul(weight, view, out=term)
            part = total
        refined[first : first + _CHANNELS_AT_ONCE] = part
    return refined


def area_filter_kept(labels: torch.Tensor, num_fg: int, threshold: float) -> torch.Tensor:
    """labels [H, W] (0 background) -> [1 + num_fg] bool: the classes that keep their scores (background always)."""
    area = torch.bincount(labels.flatten(), minlength=1 + num_fg)[1:].float()  # [num_fg]
    return torch.cat([torch.ones(1, dtype=torch.bool, device=labels.device), area > threshold * area.sum()])
