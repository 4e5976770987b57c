"""Decoding image bytes into 8-bit RGB, whatever the file's mode, orientation or bit depth."""

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps

# Refuse decompression bombs with a clear error rather than Pillow's warning; 2x Pillow's default limit.
Image.MAX_IMAGE_PIXELS = 2 * 89_478_485

# a store's preprocessing `decode`: decode_image, decode_reduced (pipeline.crops), or decode_jpeg on the compute
# device (pipeline.device_decode)
DECODES = ("full", "reduced", "device")
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# EXIF orientation -> whether the displayed image's x and y axes run against the stored ones (Pillow's
# ImageOps.exif_transpose: 2 flip left-right, 3 rotate 180, 4 flip top-bottom, 5 transpose, 6 rotate 270,
# 7 transverse, 8 rotate 90).
REVERSED_AXES = {
    2: (True, False), 3: (True, True), 4: (False, True), 6: (True, False), 7: (True, True), 8: (False, True)
}


class ImageDecodeError(ValueError):
    """The bytes are not a readable image; the message is the reason stored in the manifest."""


@dataclass(frozen=True)
class Header:
    """What an image's header says, read without decoding a pixel."""

    format: str | None  # Pillow's format name: JPEG, PNG, ...
    mode: str  # Pillow's mode of the stored pixels: RGB, L, CMYK, I;16, P, ...
    size: tuple[int, int]  # (width, height) as stored, before the EXIF orientation
    orientation: int  # EXIF orientation 1..8 (1: none, or a value Pillow's exif_transpose ignores)

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) once the orientation is applied."""
        width, height = self.size
        return (height, width) if self.orientation in (5, 6, 7, 8) else (width, height)


def read_header(data: bytes, max_pixels: int | None = None) -> Header:
    """The header of encoded image bytes (Pillow's lazy open, nothing decoded); ImageDecodeError as decode_image
    gives it for empty and non-image data and for images of more than max_pixels pixels."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    with _decode_errors(), Image.open(io.BytesIO(data)) as opened:
        _check_pixels(opened.size, max_pixels)
        orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
        orientation = orientation if orientation in range(1, 9) else 1
        return Header(opened.format, opened.mode, opened.size, orientation)


@dataclass(frozen=True)
class ReducedImage:
    """An image decoded at 1/scale of its size (JPEG only; other formats and small images at scale 1).

    Each pixel of `image` stands for scale x scale pixels of the full image: a full-image coordinate x lies at
    origin + x / scale in `image` (origin is 0 unless the orientation moved the decoder's rounded-up last
    partial pixel to the start of an axis).
    """

    image: Image.Image  # 8-bit RGB, EXIF orientation applied
    size: tuple[int, int]  # (width, height) of the full image, orientation applied
    scale: int  # 1, 2, 4 or 8
    origin: tuple[float, float]  # (x, y) in `image` of the full image's corner (0, 0)

    def box(self, full_box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        """A (left, top, right, bottom) box of the full image in this image's pixel coordinates."""
        (x, y), s = self.origin, self.scale
        left, top, right, bottom = full_box
        return x + left / s, y + top / s, x + right / s, y + bottom / s


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes to an 8-bit RGB image with its EXIF orientation applied.

    Conversions: 16-bit and 32-bit integer greyscale are scaled from 0..65535 to 0..255;
    float greyscale is clipped to 0..255; images with transparency (RGBA, LA, PA, palette with a
    transparent colour) are composited over white; CMYK, YCbCr, LAB, palette, 1-bit and greyscale go
    through Pillow's conversion. Raises ImageDecodeError for empty, truncated or non-image data, and for
    images of more than `max_pixels` pixels, told from the header before anything is decoded.
    """
    return _decode(data, max_pixels, None).image


def decode_reduced(data: bytes, min_side: int, max_pixels: int | None = None) -> ReducedImage:
    """decode_image, with a JPEG scaled down by 2, 4 or 8 inside the decoder (libjpeg's DCT scaling, Pillow's
    `draft`): the largest factor that keeps the short side at least `min_side` pixels. Decoding a 3000 x 2000
    photo this way costs a fraction of a full decode (benchmarks/decode_cost.py)."""
    return _decode(data, max_pixels, min_side)


def _decode(data: bytes, max_pixels: int | None, min_side: int | None) -> ReducedImage:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    with _decode_errors(), Image.open(io.BytesIO(data)) as opened:
        width, height = opened.size
        _check_pixels(opened.size, max_pixels)
        drafted = opened.draft(None, (min_side, min_side)) if min_side else None
        scale = round(width / drafted[1][2]) if drafted else 1  # draft's box: the full image at 1/scale
        opened.load()
        orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
        stored = opened.size
        image = ImageOps.exif_transpose(opened)
    swapped = orientation in (5, 6, 7, 8)
    size = (height, width) if swapped else (width, height)
    # The decoder rounds a reduced side up (ceil(width / scale) pixels): the extra part lies after the image
    # in stored order, so before it on an axis the orientation reverses.
    padding = [(n * scale - full) / scale for n, full in zip(stored, (width, height))]
    if swapped:
        padding.reverse()
    reversed_x, reversed_y = REVERSED_AXES.get(orientation, (False, False))
    origin = (padding[0] if reversed_x else 0.0, padding[1] if reversed_y else 0.0)
    return ReducedImage(_to_rgb(image), size, scale, origin)


def _check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"image too large: {width}x{height} = {width * height} pixels, more than --max-pixels {max_pixels}"
        )


@contextmanager
def _decode_errors() -> Iterator[None]:
    """Pillow's exceptions for bad bytes as ImageDecodeError with the manifest's reason."""
    try:
        yield
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise ImageDecodeError(_reason(exc)) from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image (unrecognised format)"
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower() or "premature end" in text.lower():
        return f"truncated image: {text}"
    return f"undecodable image: {text}"


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(values, 0, 65535) / 257.0
        return Image.fromarray(np.round(scaled).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 255)
        return Image.fromarray(np.round(values).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image
