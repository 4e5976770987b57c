"""Test-time geometry and the pixel decision: an image becomes model windows, window scores become labels.

Geometry. The image (H, W) is resized keeping its aspect ratio so that its short side is `short_side`
(448), unless that makes the long side exceed `max_long_side` (2048, GroupViT's cap), then each side
is rounded to the nearest multiple of the patch size -> (H', W'). `whole` mode sends that resized image
as one window; `slide` mode cuts it into crop x crop windows (448) every `stride` pixels (224), the last
window of a row or column moved back inside the image (a side shorter than the crop is one window).

Every window is mapped back onto the ORIGINAL pixels: original pixel j of a side belongs to window
[a, b) of the resized side when its centre j + 0.5, scaled to the resized image, lies in [a, b). The
windows' footprints tile the original image (overlapping in slide mode), and each window's scores
are produced directly at its footprint's size (bilinear resizing from the token grid happens once).

Decision (`combine_windows`). Each window gives every pixel of its footprint a score per foreground
class and a background value (the window's threshold). Scores and background values are averaged
over the windows covering the pixel; the pixel takes its best foreground class (the lowest class index
on ties), or background (0) when that best average score is strictly below the averaged background
value. With one window, a pixel thus takes its own best class, or background when that score is
strictly below the window's threshold.
"""

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

MODES = ("whole", "slide")
_ELEMENTS_PER_CHUNK = 1 << 24  # class-score elements held at once when averaging windows (64 MiB fp32)


@dataclass(frozen=True)
class Geometry:
    """How images are resized and cut into windows (pixel sizes of the resized image)."""

    mode: str = "whole"
    short_side: int = 448
    max_long_side: int = 2048
    crop_size: int = 448
    stride: int = 224

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode '{self.mode}' is not one of {', '.join(MODES)}")
        for name in ("short_side", "max_long_side", "crop_size", "stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


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


class WindowScores(Protocol):
    """One window's class scores over its footprint `box` (top, left, height, width) of the original image."""

    box: tuple[int, int, int, int]
    threshold: float  # background value of every pixel of the window

    @property
    def device(self) -> torch.device: ...

    def class_scores(self, start: int, stop: int) -> torch.Tensor:
        """Scores of foreground classes start..stop-1 -> [stop - start, h, w]."""

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Best foreground score [h, w] and its class (0-based foreground index) [h, w]."""


@dataclass
class GroupWindowScores:
    """ZeroSeg: each pixel scores as the group that owns it (argmax of the composed soft assignment)."""

    box: tuple[int, int, int, int]
    threshold: float
    owner: torch.Tensor  # [h, w] int64 group index
    group_scores: torch.Tensor  # [G, C_fg]

    @property
    def device(self) -> torch.device:
        return self.owner.device

    def class_scores(self, start: int, stop: int) -> torch.Tensor:
        return self.group_scores[:, start:stop][self.owner].permute(2, 0, 1)  # [stop - start, h, w]

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        value, index = self.group_scores.max(dim=-1)  # [G], [G]
        return value[self.owner], index[self.owner]


@dataclass
class DenseWindowScores:
    """MaskCLIP: patch scores resized bilinearly (align_corners=False) to the footprint."""

    box: tuple[int, int, int, int]
    threshold: float
    patch_scores: torch.Tensor  # [C_fg, h_tokens, w_tokens]

    @property
    def device(self) -> torch.device:
        return self.patch_scores.device

    def class_scores(self, start: int, stop: int) -> torch.Tensor:
        size = self.box[2:]
        return F.interpolate(self.patch_scores[None, start:stop], size=size, mode="bilinear", align_corners=False)[0]

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _running_best(self.class_scores, len(self.patch_scores), self.box[2:], self.device)


def window_threshold(scores: torch.Tensor, bg_threshold: float | None, keep_best_group: bool) -> float:
    """The background value of a window whose groups (or patches) score `scores` [N, C_fg]:
    bg_threshold, capped at the best score of the window with keep_best_group (GroupViT's rule: the
    window's best-scoring group is never background); -inf without threshold."""
    if bg_threshold is None:
        return -math.inf
    return min(bg_threshold, scores.max().item()) if keep_best_group else bg_threshold


def combine_windows(
    windows: list[WindowScores], height: int, width: int, num_fg: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel decision of the module docstring -> labels [H, W] int64 (0 background, k = foreground
    class k) and each pixel's best averaged foreground score [H, W] float32."""
    if len(windows) == 1:
        value, index = windows[0].best()
        return torch.where(value < windows[0].threshold, 0, index + 1), value
    device = windows[0].device
    count = torch.zeros(height, width, device=device)  # [H, W] windows covering each pixel
    background = torch.zeros(height, width, device=device)  # [H, W]
    for window in windows:
        top, left, rows, cols = window.box
        count[top : top + rows, left : left + cols] += 1
        background[top : top + rows, left : left + cols] += window.threshold
    value, index = _best_over_classes(windows, count, height, width, num_fg)
    return torch.where(value < background / count, 0, index + 1), value


def _best_over_classes(
    windows: list[WindowScores], count: torch.Tensor, height: int, width: int, num_fg: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and argmax over classes of the window-averaged scores [H, W]."""

    def averaged(start: int, stop: int) -> torch.Tensor:
        total = torch.zeros(stop - start, height, width, device=count.device)  # [chunk, H, W]
        for window in windows:
            top, left, rows, cols = window.box
            total[:, top : top + rows, left : left + cols] += window.class_scores(start, stop)
        return total / count

    return _running_best(averaged, num_fg, (height, width), count.device)


def _running_best(
    scores, num_fg: int, shape: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and argmax over classes of scores(start, stop) -> [stop - start, H, W], a chunk of classes at
    a time so that memory stays bounded for large vocabularies."""
    best = torch.full(shape, -math.inf, device=device)
    best_class = torch.zeros(shape, dtype=torch.int64, device=device)
    step = max(1, _ELEMENTS_PER_CHUNK // (shape[0] * shape[1]))
    for start in range(0, num_fg, step):
        value, index = scores(start, min(start + step, num_fg)).max(dim=0)
        better = value > best  # strictly: an earlier class keeps a tie
        best = torch.where(better, value, best)
        best_class = torch.where(better, index + start, best_class)
    return best, best_class
