"""Label maps as pictures: the VOC palette, palette PNGs, overlays with a legend, truth beside prediction."""

import numpy as np
import pytest
from PIL import Image

from zeroseg.evaluation.drawing import label_image, overlay, palette, pixel_shares


def test_palette_is_the_voc_colormap():
    colours = palette(256)
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    assert colours[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert colours[15].tolist() == [192, 128, 128] and colours[255].tolist() == [224, 224, 192]
    assert len(np.unique(palette(1001), axis=0)) == 1001


def test_label_image_round_trips_class_indices(tmp_path):
    small = np.array([[0, 1], [20, 255]], dtype=np.uint8)
    label_image(small).save(tmp_path / "small.png")
    with Image.open(tmp_path / "small.png") as reread:
        assert reread.mode == "P" and np.array_equal(np.asarray(reread), small)
    large = np.array([[0, 300], [1000, 5]])
    label_image(large).save(tmp_path / "large.png")
    with Image.open(tmp_path / "large.png") as reread:
        assert np.array_equal(np.asarray(reread), large)


def test_overlay_blends_colours_and_adds_a_legend_of_present_classes():
    image = Image.new("RGB", (40, 30), (100, 100, 100))
    labels = np.zeros((30, 40), dtype=np.uint8)
    labels[:, 20:] = 2
    labels[0, 0] = 255
    picture = overlay(image, labels, ["background", "cat", "dog"], alpha=0.5)
    assert picture.width > 40 and picture.height >= 30
    pixels = np.asarray(picture)
    assert pixels[0, 0].tolist() == [100, 100, 100]  # ignored pixel keeps the image colour
    assert pixels[5, 5].tolist() == [50, 50, 50]  # half background black
    assert pixels[5, 30].tolist() == [50, 114, 50]  # half dog (0, 128, 0)
    with pytest.raises(ValueError, match="do not match"):
        overlay(image, labels[:10], ["background", "cat", "dog"])


def test_overlay_with_truth_puts_ground_truth_beside_prediction_and_legends_pixel_shares():
    image = Image.new("RGB", (40, 30), (100, 100, 100))
    truth = np.full((30, 40), 2, dtype=np.uint8)
    truth[:, :10] = 1
    truth[0, :] = 255
    predicted = np.full((30, 40), 2, dtype=np.uint8)
    assert pixel_shares(truth) == {1: 0.25, 2: 0.75} and pixel_shares(predicted) == {2: 1.0}
    names = ["background", "cat", "dog"]
    picture = np.asarray(overlay(image, predicted, names, alpha=0.5, truth=truth))
    caption, gap = 16, 4
    assert picture.shape[1] > 2 * 40 + gap and picture.shape[0] >= 30 + caption
    assert picture[caption + 5, 5].tolist() == [114, 50, 50]  # truth: half cat (128, 0, 0)
    assert picture[caption + 5, 40 + gap + 5].tolist() == [50, 114, 50]  # prediction: half dog (0, 128, 0)
    assert picture[caption, 20].tolist() == [100, 100, 100]  # an ignored truth pixel keeps the image colour
    one_class = overlay(image, predicted, names)
    two_classes = overlay(image, truth, names)
    assert two_classes.height >= one_class.height and two_classes.width >= 40
