"""Label maps as pictures: the VOC palette, palette PNGs, colour overlays with a legend, atomic PNG writing."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from zeroseg.io import atomic_path

CAPTIONS = ("ground truth", "prediction")  # above the two pictures of overlay(..., truth=...)


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
    truth: np.ndarray | None = None,
) -> Image.Image:
    """The image with label colours blended in (alpha) and, to its right, a legend of the present classes, each
    with its share of the labelled pixels ("dog 41.2%"). With `truth`, the ground truth blended the same way
    stands left of the labels, both under a caption, and the legend gives both shares ("dog: truth 40.1%,
    predicted 41.2%").

    labels, truth: [H, W] class indices, the image's size; ignore pixels keep the image's own colour.
    """
    named = {"": labels} if truth is None else {"truth": truth, "predicted": labels}
    blended = {word: _blend(image, values, len(class_names), alpha, ignore_index) for word, values in named.items()}
    shares = {word: pixel_share for word, (_, pixel_share) in blended.items()}
    separator = " " if truth is None else ": "
    entries = [
        (index, class_names[index] + separator + ", ".join(
            f"{word} {share.get(index, 0):.1%}".lstrip() for word, share in shares.items()
        ))
        for index in sorted(set().union(*shares.values()))
    ]  # fmt: skip
    pictures = [picture for picture, _ in blended.values()]
    return _with_legend(_side_by_side(pictures, CAPTIONS if truth is not None else ()), entries, len(class_names))


def _side_by_side(pictures: list[Image.Image], captions: Sequence[str]) -> Image.Image:
    """One picture as it is; several of one size side by side, 4 px apart, under their captions."""
    if len(pictures) == 1:
        return pictures[0]
    caption, gap = 16, 4
    width, height = pictures[0].size
    canvas = Image.new("RGB", (len(pictures) * (width + gap) - gap, height + caption), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for position, (picture, text) in enumerate(zip(pictures, captions, strict=True)):
        left = position * (width + gap)
        canvas.paste(picture, (left, caption))
        draw.text((left + 2, 2), text, fill="black", font=font)
    return canvas


def _blend(
    image: Image.Image, labels: np.ndarray, num_classes: int, alpha: float, ignore_index: int
) -> tuple[Image.Image, dict[int, float]]:
    """(the image with label colours blended in, {class index: share of the labelled pixels})."""
    labels = np.asarray(labels)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match image {rgb.shape[:2]}")
    colours = palette(num_classes).astype(np.float32)
    labelled = labels != ignore_index
    blended = rgb.copy()
    blended[labelled] = (1 - alpha) * rgb[labelled] + alpha * colours[labels[labelled]]
    return Image.fromarray(blended.round().astype(np.uint8)), pixel_shares(labels, ignore_index)


def pixel_shares(labels: np.ndarray, ignore_index: int = 255) -> dict[int, float]:
    """{class index: its share of the pixels that are not ignore_index}, by class index."""
    labels = np.asarray(labels)
    kept = labels[labels != ignore_index]
    indices, counts = np.unique(kept, return_counts=True)
    return {int(index): int(count) / kept.size for index, count in zip(indices, counts)}


def _with_legend(picture: Image.Image, entries: list[tuple[int, str]], num_classes: int) -> Image.Image:
    """picture with, to its right, one line per (class index, text): the class colour and the text."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(picture)
    line, pad = 16, 6
    text_width = max([measure.textbbox((0, 0), text, font=font)[2] for _, text in entries], default=0)
    legend_width = pad * 3 + line + text_width
    height = max(picture.height, pad + line * len(entries))
    canvas = Image.new("RGB", (picture.width + legend_width, height), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    colours = palette(num_classes)
    for row, (class_index, text) in enumerate(entries):
        top = pad + row * line
        left = picture.width + pad
        swatch = tuple(int(v) for v in colours[class_index])
        draw.rectangle((left, top, left + line - 4, top + line - 4), fill=swatch)
        draw.text((left + line + pad, top), text, fill="black", font=font)
    return canvas


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically (a killed run leaves the old file or none, never a truncated one)."""
    with atomic_path(path) as partial:
        image.save(partial, format="PNG")
