"""Crop geometry: the centre square, exact grid cell boundaries and view order."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import PHOTOS
from zeroseg.pipeline.crops import cell_boundaries, centre_crop, crop_from_bytes, grid_views
from zeroseg.pipeline.images import decode_image
from zeroseg.pipeline.store_meta import view_layout


def test_cell_boundaries_are_exact_integers():
    assert cell_boundaries(224, 1) == [0, 224]
    assert cell_boundaries(224, 2) == [0, 112, 224]
    assert cell_boundaries(224, 3) == [0, 74, 149, 224]
    assert cell_boundaries(224, 4) == [0, 56, 112, 168, 224]


def test_view_layout_is_grid_by_grid_row_major():
    layout = view_layout([1, 2, 3, 4])
    assert len(layout) == 30
    assert layout[:6] == [(1, 0, 0), (2, 0, 0), (2, 0, 1), (2, 1, 0), (2, 1, 1), (3, 0, 0)]
    assert view_layout([3, 1])[-1] == (1, 0, 0)


def test_centre_crop_takes_the_centre_square():
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255  # the centre 10x10 square is white, the sides black
    crop = centre_crop(Image.fromarray(wide), 10)
    assert crop.shape == (10, 10, 3) and crop.min() == 255


def test_small_and_extreme_images_give_full_size_crops():
    for size in [(3, 5), (4000, 7), (7, 4000)]:
        crop = centre_crop(Image.new("RGB", size, (9, 99, 199)), 224)
        assert crop.shape == (224, 224, 3)
        assert np.abs(crop.astype(int) - [9, 99, 199]).max() <= 1


def test_grid_views_cut_cells_in_order_and_normalise():
    crop = np.zeros((1, 6, 6, 3), dtype=np.uint8)
    crop[0, :3, 3:] = 255  # top-right quadrant white
    views = grid_views(torch.from_numpy(crop), [1, 2], 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert views.shape == (1, 5, 3, 3, 3)
    quadrant_means = views[0, 1:].mean(dim=(1, 2, 3))
    assert torch.allclose(quadrant_means, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    mean_std = grid_views(torch.full((1, 4, 4, 3), 255, dtype=torch.uint8), [1], 4, (0.5,) * 3, (0.25,) * 3)
    assert torch.allclose(mean_std, torch.full_like(mean_std, 2.0))



def test_views_in_bfloat16_are_the_float32_views_rounded():
    crops = torch.randint(0, 256, (2, 50, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    single = grid_views(crops, [1, 2, 3, 4], 32, mean, std)
    half = grid_views(crops, [1, 2, 3, 4], 32, mean, std, torch.bfloat16)
    assert single.dtype == torch.float32 and half.dtype == torch.bfloat16 and half.shape == (2, 30, 3, 32, 32)
    assert torch.equal(half, single.to(torch.bfloat16))
    assert ((half.float() - single).abs() <= single.abs() * 2**-8 + 1e-6).all()  # bfloat16 keeps 8 bits

def test_full_decode_is_the_centre_crop_and_reduced_matches_it_below_twice_the_crop_side():
    for photo in PHOTOS:
        data = photo.read_bytes()
        full, size = crop_from_bytes(data, 224)
        np.testing.assert_array_equal(full, centre_crop(decode_image(data), 224))
        reduced, reduced_size = crop_from_bytes(data, 224, decode="reduced")
        assert reduced_size == size == Image.open(photo).size
        if min(size) < 2 * 224:  # no reduction: the very same pixels
            np.testing.assert_array_equal(reduced, full)
        else:
            assert 0 < np.abs(reduced.astype(int) - full).mean() < 5


@pytest.mark.parametrize("orientation", range(1, 9))
def test_reduced_crop_covers_the_full_crop_in_every_orientation(orientation):
    """509 x 389 at crop 48 decodes at 1/8 with a partial last pixel on both axes; on a ramp, a crop box off by
    that part would shift every pixel's value."""
    ys, xs = np.mgrid[0:389, 0:509]
    ramp = np.stack([xs * 255 / 509, ys * 255 / 389, (xs + ys) * 255 / 898], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    full, size = crop_from_bytes(buffer.getvalue(), 48)
    reduced, reduced_size = crop_from_bytes(buffer.getvalue(), 48, decode="reduced")
    assert reduced_size == size == ((389, 509) if orientation >= 5 else (509, 389))
    difference = reduced.astype(float) - full  # (48, 48, 3)
    assert np.abs(difference.mean(axis=(0, 1))).max() < 0.5 and np.abs(difference).max() <= 2
