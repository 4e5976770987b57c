import math

import numpy as np
import pytest
import torch
from PIL import Image

from zeroseg.evaluation.labeling import comparison, compose_assignments, label_image, overlay, palette, pixel_shares
from zeroseg.evaluation.segmenter import LabelingRule
from zeroseg.evaluation.windows import GroupWindowScores, combine_windows

# A 2x2 token grid (row-major tokens t0 t1 / t2 t3) grouped into 3, then 2 groups.
STAGE_ONE = torch.tensor(
    [[[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]]]
)  # [B=1, HW=4, G1=3]
STAGE_TWO = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]])  # [B=1, G1=3, G2=2]


def test_composition_chains_the_stages_and_keeps_the_token_grid():
    scores = compose_assignments([STAGE_ONE, STAGE_TWO], grid_hw=(2, 2), out_hw=(2, 2))
    # token -> final group = sum over first-stage groups, e.g. t0: 0.8*1 + 0.1*0.5 = 0.85 for group 0.
    expected = torch.tensor([[[0.85, 0.45], [0.15, 0.30]], [[0.15, 0.55], [0.85, 0.70]]])  # [G2, h, w]
    assert scores.shape == (1, 2, 2, 2)
    torch.testing.assert_close(scores[0], expected)
    assert scores[0].argmax(dim=0).tolist() == [[0, 1], [1, 1]]  # each pixel's owner group


def test_composition_resizes_bilinearly_to_the_image():
    scores = compose_assignments([STAGE_ONE, STAGE_TWO], grid_hw=(2, 2), out_hw=(4, 6))
    assert scores.shape == (1, 2, 4, 6)
    torch.testing.assert_close(scores[0, :, 0, 0], torch.tensor([0.85, 0.15]))  # corners keep token values
    torch.testing.assert_close(scores[0, :, 3, 5], torch.tensor([0.30, 0.70]))
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(1, 4, 6))  # soft maps stay distributions


def test_composition_with_a_single_final_group_and_a_wrong_grid():
    to_one = torch.ones(1, 3, 1)  # [B, G1=3, G2=1]
    scores = compose_assignments([STAGE_ONE, to_one], grid_hw=(2, 2), out_hw=(3, 3))
    torch.testing.assert_close(scores, torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="grid 3x3"):
        compose_assignments([STAGE_ONE], grid_hw=(3, 3), out_hw=(3, 3))


# Groups g0 = x, g1 = 0.6x + 0.8y, g2 = -x against classes 1 = x and 2 = y (cosines 1; 0.8; 0).
GROUPS = torch.tensor([[2.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
CLASSES = torch.tensor([[1.0, 0.0], [0.0, 3.0]])


def group_labels(bg_threshold, logit_scale=None, keep_best_group=False) -> list[int]:
    """The labels of GROUPS as the segmenter decides them: LabelingRule's scores and threshold, then
    combine_windows over a one-window image of 1 x 3 pixels, pixel g owned by group g."""
    rule = LabelingRule(CLASSES, logit_scale, bg_threshold, keep_best_group)
    scores = rule.scores(GROUPS)  # [G, C_fg]
    owner = torch.arange(len(GROUPS))[None]  # [1, G]
    window = GroupWindowScores((0, 0, 1, len(GROUPS)), rule.threshold(scores), owner, scores)
    labels, _ = combine_windows([window], 1, len(GROUPS), num_fg=len(CLASSES))
    return labels[0].tolist()


def test_each_group_takes_its_nearest_class_or_background_below_the_threshold():
    assert group_labels(bg_threshold=0.5) == [1, 2, 0]
    assert group_labels(bg_threshold=0.8) == [1, 2, 0]  # 0.8 is not below 0.8
    assert group_labels(bg_threshold=0.9) == [1, 0, 0]
    assert group_labels(bg_threshold=-1.0) == [1, 2, 2]
    assert group_labels(bg_threshold=None) == [1, 2, 2]  # no background at all


def test_keep_best_group_caps_the_threshold_at_the_best_group_score():
    assert group_labels(bg_threshold=1.5) == [0, 0, 0]
    assert group_labels(bg_threshold=1.5, keep_best_group=True) == [1, 0, 0]
    assert group_labels(bg_threshold=0.5, keep_best_group=True) == [1, 2, 0]


def test_logit_scale_scores_groups_by_softmax_probability():
    # scale 2: g1's probability for class 2 is sigmoid(2 * (0.8 - 0.6)) = 0.599 < 0.6 (its cosine is 0.8);
    # g2's is sigmoid(2 * (0 - -1)) = 0.88 (its cosine is 0).
    assert group_labels(0.6) == [1, 2, 0]
    assert group_labels(0.6, logit_scale=math.log(2.0)) == [1, 0, 2]
    # the scale is capped at 100 as in CLIP: exp(10) behaves like 100, where g1 scores ~1.
    capped = group_labels(0.99, logit_scale=torch.tensor(10.0))
    assert capped == group_labels(0.99, logit_scale=math.log(100.0))
    assert capped == [1, 2, 2]


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


def test_comparison_puts_ground_truth_beside_prediction_and_legends_pixel_shares():
    image = Image.new("RGB", (40, 30), (100, 100, 100))
    truth = np.full((30, 40), 2, dtype=np.uint8)
    truth[:, :10] = 1
    truth[0, :] = 255
    predicted = np.full((30, 40), 2, dtype=np.uint8)
    assert pixel_shares(truth) == {1: 0.25, 2: 0.75} and pixel_shares(predicted) == {2: 1.0}
    names = ["background", "cat", "dog"]
    picture = np.asarray(comparison(image, truth, predicted, names, alpha=0.5))
    caption, gap = 16, 4
    assert picture.shape[1] > 2 * 40 + gap and picture.shape[0] >= 30 + caption
    assert picture[caption + 5, 5].tolist() == [114, 50, 50]  # truth: half cat (128, 0, 0)
    assert picture[caption + 5, 40 + gap + 5].tolist() == [50, 114, 50]  # prediction: half dog (0, 128, 0)
    assert picture[caption, 20].tolist() == [100, 100, 100]  # an ignored truth pixel keeps the image colour
    one_class = overlay(image, predicted, names)
    two_classes = overlay(image, truth, names)
    assert two_classes.height >= one_class.height and two_classes.width >= 40
