"""Decoding: every odd kind of image becomes correct 8-bit RGB, every broken file a clear reason."""

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PHOTOS
from zeroseg.pipeline.images import ImageDecodeError, decode_image


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def test_rgb_jpeg_round_trip():
    image = decode_image(PHOTOS[0].read_bytes())
    assert image.mode == "RGB" and image.size == Image.open(PHOTOS[0]).size


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    decoded = np.asarray(decode_image(encode(Image.fromarray(values), "PNG")))
    assert decoded.shape == (1, 4, 3)
    assert decoded[0, :, 0].tolist() == [0, 1, 128, 255]


def test_transparency_is_composited_over_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 20, 255)  # opaque colour stays
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent becomes white
    rgba[1, 0] = (0, 0, 0, 128)  # half black over white
    decoded = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert decoded[0, 0].tolist() == [200, 10, 20]
    assert decoded[0, 1].tolist() == [255, 255, 255]
    assert abs(int(decoded[1, 0, 0]) - 127) <= 1


def test_palette_greyscale_and_cmyk_convert_to_rgb():
    palette = Image.new("P", (3, 3))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((1, 1), 1)
    assert np.asarray(decode_image(encode(palette, "PNG")))[1, 1].tolist() == [10, 200, 30]
    grey = Image.new("L", (4, 4), 77)
    assert np.asarray(decode_image(encode(grey, "JPEG", quality=100))).mean() == pytest.approx(77, abs=1)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    red = np.asarray(decode_image(encode(cmyk, "JPEG", quality=100))).reshape(-1, 3).mean(axis=0)
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to display
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=100))
    assert decoded.size == (20, 40)
    top = np.asarray(decoded)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the stored left (blue) half is now on top


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not a JPEG\n" * 10, "not an image"),
        (PHOTOS[0].read_bytes()[:3000], "truncated"),
    ],
)
def test_broken_files_raise_a_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)
