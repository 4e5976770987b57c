"""Generated inputs of the agreement runs (tests/published_reference.py): smooth random colour images whose
sides are not multiples of the patch, and SCLIP's VOC name list (configs/cls_voc21.txt)."""

import numpy as np
import torch
import torch.nn.functional as F

SIZES = ((181, 250), (243, 173), (203, 203))
SCLIP_VOC = (
    "sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, building, cloud, lamp, door, window, "
    "wardrobe, ceiling, shelf, curtain, stair, floor, hill, rail, fence", "aeroplane", "bicycle", "bird", "ship",
    "bottle", "bus", "car", "cat", "chair", "cow", "table", "dog", "horse", "motorbike",
    "person, person in shirt, person in jeans, person in dress, person in sweater, person in skirt, person in jacket",
    "pottedplant", "sheep", "sofa", "train", "television monitor, tv monitor, monitor, television, screen",
)  # fmt: skip


def images(seed: int = 0) -> list[np.ndarray]:
    """[H, W, 3] uint8 images: 5 x 6 random colours resized bicubically, plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for height, width in SIZES:
        coarse = torch.rand(1, 3, 5, 6, generator=generator) * 255
        smooth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
        noisy = smooth + 8 * torch.randn(smooth.shape, generator=generator)
        out.append(noisy.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    return out


def query_lists(lines) -> tuple[list[str], list[int]]:
    """SCLIP's get_cls_idx: names split on ', ', each with the index of its line."""
    names, classes = [], []
    for index, line in enumerate(lines):
        parts = line.split(", ")
        names += parts
        classes += [index] * len(parts)
    return names, classes
