"""Label maps as pictures: the VOC palette, palette PNGs, colour overlays with a legend, atomic PNG writing."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from zeroseg.pipeline.atomic import atomic_path


def palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colormap: [num_classes, 3] uint8, class bits spread over the colour bits."""
    index = np.arange(num_classes)
    colours = np.zeros((num_classes, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            colours[:, channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
    return colours.astype(np.uint8)


def label_image(labels: np.ndarray) -> Image.Image:
    """[H, W] class indices -> a PNG-ready image: palette mode with VOC colours when all fit in a byte
    (255 stays the ignore colour), else 16-bit greyscale."""
    labels = np.asarray(labels)
    if labels.size and labels.max() > 255:
        return Image.fromarray(labels.astype(np.uint16))  # mode I;16
    image = Image.fromarray(labels.astype(np.uint8))  # mode L; the palette makes it P
    image.putpalette(palette(256).tobytes())
    return image


def overlay(
    image: Image.Image,
    labels: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.5,
    ignore_index: int = 255,
) -> Image.Image:
    """The image with label colours blended in (alpha) and, to its right, a legend of present classes.

    labels: [H, W] class indices, the image's size; ignore pixels keep the image's own colour.
    """
    labels = np.asarray(labels)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match image {rgb.shape[:2]}")
    colours = palette(len(class_names)).astype(np.float32)
    labelled = labels != ignore_index
    blended = rgb.copy()
    blended[labelled] = (1 - alpha) * rgb[labelled] + alpha * colours[labels[labelled]]
    present = [int(c) for c in np.unique(labels[labelled])]
    return _with_legend(Image.fromarray(blended.round().astype(np.uint8)), present, class_names)


def _with_legend(picture: Image.Image, present: list[int], class_names: Sequence[str]) -> Image.Image:
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(picture)
    line, pad = 16, 6
    text_width = max([measure.textbbox((0, 0), class_names[c], font=font)[2] for c in present], default=0)
    legend_width = pad * 3 + line + text_width
    height = max(picture.height, pad + line * len(present))
    canvas = Image.new("RGB", (picture.width + legend_width, height), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    colours = palette(len(class_names))
    for row, class_index in enumerate(present):
        top = pad + row * line
        left = picture.width + pad
        swatch = tuple(int(v) for v in colours[class_index])
        draw.rectangle((left, top, left + line - 4, top + line - 4), fill=swatch)
        draw.text((left + line + pad, top), class_names[class_index], fill="black", font=font)
    return canvas


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (a killed run leaves the old file or none, never a truncated one)."""
    with atomic_path(path) as partial:
        image.save(partial, format="PNG")
