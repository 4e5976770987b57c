"""Decoding image bytes into 8-bit RGB, whatever the file's mode, orientation or bit depth."""

import io

import numpy as np
from PIL import Image, ImageOps

# Refuse decompression bombs with a clear error rather than Pillow's warning; 2x Pillow's default limit.
Image.MAX_IMAGE_PIXELS = 2 * 89_478_485

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageDecodeError(ValueError):
    """The bytes are not a readable image; the message is the reason stored in the manifest."""


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes to an 8-bit RGB image with its EXIF orientation applied.

    Conversions: 16-bit and 32-bit integer greyscale are scaled from 0..65535 to 0..255;
    float greyscale is clipped to 0..255; images with transparency (RGBA, LA, PA, palette with a
    transparent colour) are composited over white; CMYK, YCbCr, LAB, palette, 1-bit and greyscale go
    through Pillow's conversion. Raises ImageDecodeError for empty, truncated or non-image data, and for
    images of more than `max_pixels` pixels, told from the header before anything is decoded.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large: {width}x{height} = {width * height} pixels, more than --max-pixels {max_pixels}"
                )
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        raise ImageDecodeError(_reason(exc)) from None
    return _to_rgb(image)


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
