"""Decoding: every odd kind of image becomes correct 8-bit RGB, every broken file a clear reason."""

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PHOTOS
from zeroseg.pipeline.images import ImageDecodeError, decode_image, decode_reduced


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


def test_reduced_decode_scales_a_jpeg_by_the_largest_factor_that_keeps_the_short_side():
    photo = PHOTOS[0].read_bytes()  # 500 x 281
    for min_side, scale in [(64, 4), (35, 8), (140, 2), (141, 1), (1000, 1)]:
        reduced = decode_reduced(photo, min_side)
        assert (reduced.scale, reduced.size) == (scale, (500, 281)), min_side
        assert reduced.image.mode == "RGB" and reduced.image.size == (-(-500 // scale), -(-281 // scale))
        assert min(reduced.image.size) >= min(min_side, 281)
    assert np.array_equal(np.asarray(decode_reduced(photo, 1000).image), np.asarray(decode_image(photo)))
    png = encode(Image.open(PHOTOS[0]), "PNG")  # only JPEGs scale in the decoder
    assert decode_reduced(png, 64).scale == 1
    assert np.array_equal(np.asarray(decode_reduced(png, 64).image), np.asarray(decode_image(png)))


def test_reduced_decode_keeps_orientation_modes_and_limits():
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 40, 40))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    reduced = decode_reduced(encode(image, "JPEG", exif=exif.tobytes(), quality=100), 10)
    assert (reduced.scale, reduced.size, reduced.image.size) == (4, (40, 80), (10, 20))
    top = np.asarray(reduced.image)[2, 5]
    assert top[2] > 200 and top[0] < 60  # the stored left (blue) half is on top
    grey = decode_reduced(encode(Image.new("L", (64, 64), 77), "JPEG", quality=100), 8)
    assert grey.scale == 8 and grey.image.mode == "RGB" and np.asarray(grey.image).mean() == pytest.approx(77, abs=1)
    cmyk = decode_reduced(encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=100), 16)
    red = np.asarray(cmyk.image).reshape(-1, 3).mean(axis=0)
    assert cmyk.scale == 4 and red[0] > 240 and red[1] < 15 and red[2] < 15
    sixteen = encode(Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16)), "PNG")
    assert np.asarray(decode_reduced(sixteen, 1).image)[0, :, 0].tolist() == [0, 1, 128, 255]
    with pytest.raises(ImageDecodeError, match="500x281 = 140500 pixels, more than --max-pixels 140499"):
        decode_reduced(PHOTOS[0].read_bytes(), 32, max_pixels=140_499)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_reduced(PHOTOS[0].read_bytes()[:3000], 32)


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
