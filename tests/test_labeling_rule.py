"""The labeling rule: composed group assignments, class scores, the image prior, background and window fusion."""

import math

import numpy as np
import pytest
import torch

from tests.groupvit_reference import numpy_groupvit_labels
from zeroseg.evaluation.labeling_rule import NEVER, GroupWindow, LabelingRule, compose_assignments

# A 2x2 token grid (row-major tokens t0 t1 / t2 t3) grouped into 3, then 2 groups.
STAGE_ONE = torch.tensor([[[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]]])  # [B=1, HW=4, G1=3]
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
    """The labels of GROUPS as the segmenter decides them (softmax rule) over a one-window image of 1 x 3
    pixels, pixel g owned by group g."""
    rule = LabelingRule(CLASSES, logit_scale, bg_threshold, keep_best_group, name="softmax")
    owner = torch.arange(len(GROUPS))[None]  # [1, G]
    window = rule.group_window((0, 0, 1, len(GROUPS)), owner, GROUPS, GROUPS[0])
    labels, _ = rule.decide([window], (1, len(GROUPS)), (1, len(GROUPS)))
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


def evaluator_labels(groups, image, text, logit_scale, bg_threshold, owner, name="groupvit"):
    """The same window through LabelingRule: group_window, decide (1 x P pixels)."""
    text = torch.as_tensor(text, dtype=torch.float32)
    rule = LabelingRule(text, logit_scale, bg_threshold, name=name)
    owner = torch.as_tensor(owner)[None]  # [1, P]
    groups, image = torch.as_tensor(groups, dtype=torch.float32), torch.as_tensor(image, dtype=torch.float32)
    window = rule.group_window((0, 0, 1, owner.shape[1]), owner, groups, image)
    labels, _ = rule.decide([window], (1, owner.shape[1]), (1, owner.shape[1]))
    return labels[0].numpy()


EYE = np.eye(8, dtype=np.float32)  # classes 1..6 are the axes e0..e5
TEXT6 = EYE[:6]
SCALE = math.log(10.0)


def test_the_top_k_image_prior_removes_a_class_that_would_otherwise_win():
    image = EYE[0] + EYE[1] + EYE[2] + EYE[3] + EYE[4] + 0.1 * EYE[5]  # its top 5: classes 1..5, not 6
    groups = np.stack([EYE[5] + 0.5 * EYE[1], EYE[0]])  # group 0 is nearest to class 6
    owner = np.array([0, 1])
    expected = numpy_groupvit_labels(groups, image, TEXT6, SCALE, 0.0, owner)
    assert expected.tolist() == [2, 1]  # group 0 falls back to its best class inside the prior
    assert evaluator_labels(groups, image, TEXT6, SCALE, 0.0, owner).tolist() == expected.tolist()
    assert evaluator_labels(groups, image, TEXT6, SCALE, 0.0, owner, name="softmax").tolist() == [6, 1]


def test_the_product_with_the_full_softmax_puts_a_group_below_the_threshold():
    text = EYE  # 8 classes
    image = EYE[0] + EYE[1] + EYE[2] + EYE[3] + EYE[4]  # prior: classes 1..5
    groups = np.stack([EYE[0], EYE[1] + EYE[5] + EYE[6] + EYE[7]])  # group 1: A(class 2) ~1/4, A_top ~1
    owner = np.array([0, 1])
    assert numpy_groupvit_labels(groups, image, text, SCALE, 0.35, owner, product=False).tolist() == [1, 2]
    expected = numpy_groupvit_labels(groups, image, text, SCALE, 0.35, owner)
    assert expected.tolist() == [1, 0]  # P ~ 1/4 < 0.35
    assert evaluator_labels(groups, image, text, SCALE, 0.35, owner).tolist() == expected.tolist()


def test_keep_best_keeps_the_best_group_of_a_low_confidence_window():
    image = EYE[0] + EYE[1]
    groups = np.stack([EYE[0] + 0.9 * EYE[1], 0.1 * EYE[1] + EYE[6]])  # P ~0.45 and ~0.1, both below 0.95
    owner = np.array([0, 0, 1])
    expected = numpy_groupvit_labels(groups, image, TEXT6, SCALE, 0.95, owner)
    assert expected.tolist() == [1, 1, 0]
    assert evaluator_labels(groups, image, TEXT6, SCALE, 0.95, owner).tolist() == expected.tolist()
    assert evaluator_labels(groups, image, TEXT6, SCALE, 0.95, owner, name="softmax").tolist() == [0, 0, 0]


def test_random_windows_match_the_numpy_transcription():
    generator = np.random.default_rng(0)
    for _ in range(20):
        groups, image, text = generator.normal(size=(6, 16)), generator.normal(size=16), generator.normal(size=(9, 16))
        owner = generator.integers(0, 6, size=40)
        threshold = float(generator.uniform(0.0, 0.6))
        expected = numpy_groupvit_labels(groups, image, text, math.log(30.0), threshold, owner)
        got = evaluator_labels(
            groups.astype(np.float32), image.astype(np.float32), text, math.log(30.0), threshold, owner
        )
        assert got.tolist() == expected.tolist()


def test_rule_choices_are_checked_and_recorded():
    with pytest.raises(ValueError, match="rule 'mmseg' is not one of groupvit, softmax"):
        LabelingRule(torch.eye(2), 0.0, 0.5, name="mmseg")
    with pytest.raises(ValueError, match="needs the CLIP's logit_scale"):
        LabelingRule(torch.eye(2), None, 0.5)
    record = LabelingRule(torch.eye(3), 0.0, 0.35).to_dict()
    assert record["rule"] == "groupvit" and record["top_k"] == 3 and record["keep_best_group"] is True
    assert "mmseg" in record["window_fusion"]


@pytest.mark.parametrize("name", ["groupvit", "softmax"])
def test_a_vocabulary_without_background_labels_every_pixel_with_its_class_index(name):
    # Two groups over a 1x3 window: pixel 0 owned by group 0, pixels 1, 2 by group 1; three classes.
    group_scores = torch.tensor([[0.02, 0.97, 0.01], [0.30, 0.30, 0.40]])  # [G, C]
    rule = LabelingRule(torch.eye(3), 0.0, None, name=name, background=False)
    table = torch.cat([torch.full((2, 1), NEVER), group_scores], dim=1)  # no threshold: background never wins
    window = GroupWindow((0, 0, 1, 3), torch.tensor([[0, 1, 1]]), table)
    labels, scores = rule.decide([window], (1, 3), (1, 3))
    assert labels.tolist() == [[1, 2, 2]]  # class indices 0..C-1: no label is reserved for background
    torch.testing.assert_close(scores, torch.tensor([[0.97, 0.40, 0.40]]))
    assert rule.to_dict()["background_class"] is False
    with pytest.raises(ValueError, match="without background"):
        LabelingRule(torch.eye(3), 0.0, 0.5, name=name, background=False)
