"""Test-time geometry: an image becomes model windows, each with its footprint on the original image.

Geometry. The image (H, W) is resized keeping its aspect ratio so that its short side is `short_side`
(448), unless that makes the long side exceed `max_long_side` (2048, GroupViT's cap), then each side
is rounded to the nearest multiple of the patch size -> (H', W'). `whole` mode sends that resized image
as one window; `slide` mode cuts it into crop x crop windows (448) every `stride` pixels (224), the last
window of a row or column moved back inside the image (a side shorter than the crop is one window).

Every window is mapped back onto the ORIGINAL pixels: original pixel j of a side belongs to window
[a, b) of the resized side when its centre j + 0.5, scaled to the resized image, lies in [a, b). The
windows' footprints tile the original image (overlapping in slide mode), and each window's scores
are produced directly at its footprint's size (bilinear resizing from the token grid happens once).

How window scores become labels is evaluation.labeling_rule.
"""

import math
from dataclasses import dataclass

from zeroseg.errors import require

MODES = ("whole", "slide")


@dataclass(frozen=True)
class Geometry:
    """How images are resized and cut into windows (pixel sizes of the resized image); the fields are the
    --mode, --short-side, --max-long-side, --crop-size and --stride options of zs-eval and zs-segment."""

    mode: str = "whole"
    short_side: int = 448
    max_long_side: int = 2048
    crop_size: int = 448
    stride: int = 224

    def __post_init__(self) -> None:
        require(self.mode in MODES, f"--mode '{self.mode}' is not one of {', '.join(MODES)}")
        for name in ("short_side", "max_long_side", "crop_size", "stride"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class Window:
    """A crop of the resized image (top, left, height, width) and its footprint on the original image."""

    resized: tuple[int, int, int, int]
    original: tuple[int, int, int, int]


def resized_shape(height: int, width: int, geometry: Geometry, multiple: int) -> tuple[int, int]:
    """(H', W'): keep-ratio resize to the short side (long side capped), sides rounded to `multiple`."""
    scale = min(geometry.short_side / min(height, width), geometry.max_long_side / max(height, width))
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of crops along one side: every stride, the last one moved back inside."""
    if length <= crop:
        return [0]
    count = math.ceil((length - crop) / stride) + 1
    return sorted({min(index * stride, length - crop) for index in range(count)})


def plan_windows(original_hw: tuple[int, int], resized_hw: tuple[int, int], geometry: Geometry) -> list[Window]:
    """The windows of one image, row-major; in whole mode the single window covers everything."""
    height, width = original_hw
    rows, cols = resized_hw
    if geometry.mode == "whole":
        return [Window((0, 0, rows, cols), (0, 0, height, width))]
    crop_h, crop_w = min(geometry.crop_size, rows), min(geometry.crop_size, cols)
    windows = []
    for top in window_starts(rows, crop_h, geometry.stride):
        for left in window_starts(cols, crop_w, geometry.stride):
            y0, y1 = _to_original(top, height, rows), _to_original(top + crop_h, height, rows)
            x0, x1 = _to_original(left, width, cols), _to_original(left + crop_w, width, cols)
            if y1 > y0 and x1 > x0:
                windows.append(Window((top, left, crop_h, crop_w), (y0, x0, y1 - y0, x1 - x0)))
    return windows


def _to_original(edge: int, original: int, resized: int) -> int:
    """First original pixel whose centre, scaled to the resized side, is at or after `edge`:
    ceil(edge * original / resized - 1/2), in integers."""
    return -(-(2 * edge * original - resized) // (2 * resized))
