"""Test-time geometry, as GroupViT's test pipeline (mmcv 0.x / mmseg 0.x) runs it: an image becomes windows
of its resized copy.

Resize (mmcv `imrescale`, `Resize(keep_ratio=True)` with img_scale (max_long_side, short_side)): scale =
min(short_side / short side, max_long_side / long side), each side int(side * scale + 0.5), NOT rounded to
the patch; the pixels resized bilinearly (cv2 INTER_LINEAR: half-pixel centres, no antialiasing), uint8.
`whole` mode sends the resized image as one window; `slide` mode (mmseg `slide_inference`) cuts it into
crop x crop windows, h_grids = max(H' - crop + stride - 1, 0) // stride + 1 of them down (likewise across),
window i from min(i * stride + crop, H') - crop (not below 0). The windows' maps are fused on the resized
image and resized once to the original size (evaluation.labeling_rule). A window whose side is not a
multiple of the patch is seen as the method's own code sees it (evaluation.segmenter).
"""

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


def resized_shape(height: int, width: int, geometry: Geometry) -> tuple[int, int]:
    """(H', W'): mmcv's keep-ratio size, short side to `short_side`, long side capped at `max_long_side`."""
    scale = min(geometry.short_side / min(height, width), geometry.max_long_side / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """mmseg's slide_inference offsets along one side: every stride, the last one moved back inside."""
    grids = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(index * stride + crop, length) - crop, 0) for index in range(grids)]


def plan_windows(resized_hw: tuple[int, int], geometry: Geometry) -> list[tuple[int, int, int, int]]:
    """The windows (top, left, height, width) of the resized image, row-major; whole mode: one, everything."""
    rows, cols = resized_hw
    if geometry.mode == "whole":
        return [(0, 0, rows, cols)]
    crop_h, crop_w = min(geometry.crop_size, rows), min(geometry.crop_size, cols)
    return [
        (top, left, crop_h, crop_w)
        for top in window_starts(rows, geometry.crop_size, geometry.stride)
        for left in window_starts(cols, geometry.crop_size, geometry.stride)
    ]
