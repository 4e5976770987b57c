"""The test-time segmenter: geometry, the window decision rule, MaskCLIP's dense features, ZeroSeg labeling."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_TEACHER, VOC_ROOT
from tests.groupvit_reference import numpy_groupvit_labels
from zeroseg.evaluation import labeling_rule as rule_module
from zeroseg.evaluation.datasets import VOC_CLASS_NAMES
from zeroseg.evaluation.dense_clip import dense_features
from zeroseg.evaluation.labeling_rule import (
    DenseWindowScores,
    GroupWindowScores,
    LabelingRule,
    class_scores,
    combine_windows,
    compose_assignments,
)
from zeroseg.evaluation.segmenter import DenseClipScorer, WindowSegmenter, ZeroSegScorer, describe_segments
from zeroseg.evaluation.text import class_text_embeddings
from zeroseg.evaluation.windows import Geometry, plan_windows, resized_shape, window_starts
from zeroseg.pipeline.teacher import create_clip, resolve_identity
from zeroseg.trainer.model import ZeroSeg
from zeroseg.trainer.model_config import model_preset

PHOTO = VOC_ROOT / "JPEGImages" / "2007_000033.jpg"  # 500 x 366
SMALL = dict(short_side=64, crop_size=64, stride=32)


@pytest.fixture(scope="module")
def clip():
    identity = resolve_identity(str(TINY_TEACHER), "none")
    return identity, create_clip(identity, torch.device("cpu"))


@pytest.fixture(scope="module")
def text(clip, tmp_path_factory):
    identity, model = clip
    return class_text_embeddings(model, identity, VOC_CLASS_NAMES[1:], cache_dir=tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return ZeroSeg(model_preset("tiny")).eval()


def segmenter(scorer, rule, **geometry) -> WindowSegmenter:
    return WindowSegmenter(scorer, rule, Geometry(**geometry), (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))


def test_resize_keeps_the_ratio_caps_the_long_side_and_rounds_to_the_patch():
    assert resized_shape(375, 500, Geometry(), 16) == (448, 592)  # 448 x 597.3 -> multiples of 16
    assert resized_shape(500, 375, Geometry(), 14) == (602, 448)
    assert resized_shape(100, 5000, Geometry(), 16) == (48, 2048)  # long side capped: scale 2048 / 5000
    assert resized_shape(366, 500, Geometry(short_side=64), 8) == (64, 88)


def test_slide_windows_step_by_the_stride_and_tile_the_original_image():
    assert window_starts(900, 448, 224) == [0, 224, 448, 452]
    assert window_starts(448, 448, 224) == [0] and window_starts(300, 448, 224) == [0]
    plan = plan_windows((366, 500), (64, 88), Geometry(mode="slide", **SMALL))
    assert [w.resized for w in plan] == [(0, 0, 64, 64), (0, 24, 64, 64)]
    covered = np.zeros((366, 500), dtype=int)
    for window in plan:
        top, left, rows, cols = window.original
        covered[top : top + rows, left : left + cols] += 1
    assert covered.min() == 1 and covered.max() == 2
    assert plan[1].original == (0, 136, 366, 364)  # resized column 24 -> original pixel ceil(24 * 500 / 88 - 1/2)
    (whole,) = plan_windows((366, 500), (64, 88), Geometry(mode="whole"))
    assert whole.original == (0, 0, 366, 500)


def random_group_window(box, threshold, groups=5, classes=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, groups, box[2:], generator=generator)
    scores = torch.rand(groups, classes, generator=generator).softmax(dim=-1)
    return GroupWindowScores(box, threshold, owner, scores)


def labels_by_group(group_scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """[G, C_fg] -> [G]: each group's best class + 1, or 0 when that score is below the threshold."""
    best, best_class = group_scores.max(dim=-1)
    return torch.where(best < threshold, 0, best_class + 1)


def test_one_window_gives_each_pixel_its_groups_best_class_or_background():
    generator = torch.Generator().manual_seed(0)
    group_emb, text_emb = torch.randn(6, 16, generator=generator), torch.randn(7, 16, generator=generator)
    group_scores = class_scores(group_emb, text_emb, logit_scale=math.log(10.0))  # [G, C_fg]
    threshold = group_scores.max(dim=-1).values.median().item()  # half the groups fall below
    owner = torch.arange(6 * 9).reshape(6, 9) % 6
    labels, _ = combine_windows([GroupWindowScores((0, 0, 6, 9), threshold, owner, group_scores)], 6, 9, num_fg=7)
    assert labels.tolist() == labels_by_group(group_scores, threshold)[owner].tolist()
    assert 0 < (labels == 0).sum() < labels.numel()


def test_overlapping_windows_average_scores_and_background_values():
    left = GroupWindowScores((0, 0, 1, 3), 0.5, torch.zeros(1, 3, dtype=torch.int64), torch.tensor([[0.6, 0.4]]))
    right = GroupWindowScores((0, 1, 1, 3), 0.2, torch.zeros(1, 3, dtype=torch.int64), torch.tensor([[0.1, 0.9]]))
    labels, scores = combine_windows([left, right], 1, 4, num_fg=2)
    # column 0: left only -> class 1 (0.6 >= 0.5); columns 1-2: (0.35, 0.65) vs background 0.35 -> class 2;
    # column 3: right only -> class 2.
    assert labels.tolist() == [[1, 2, 2, 2]]
    torch.testing.assert_close(scores, torch.tensor([[0.6, 0.65, 0.65, 0.9]]))
    darker = GroupWindowScores((0, 1, 1, 3), 0.9, right.owner, right.group_scores)
    assert combine_windows([left, darker], 1, 4, num_fg=2)[0].tolist() == [[1, 0, 0, 2]]  # 0.65 < 0.7; 0.9 not < 0.9


def test_the_many_window_path_equals_the_one_window_path_and_class_chunks_do_not_matter(monkeypatch):
    window = random_group_window((0, 0, 8, 8), threshold=0.15, classes=30)
    alone = combine_windows([window], 8, 8, num_fg=30)
    twice = combine_windows([window, window], 8, 8, num_fg=30)
    monkeypatch.setattr(rule_module, "_ELEMENTS_PER_CHUNK", 64 * 4)  # 4 classes per chunk
    chunked = combine_windows([window, window], 8, 8, num_fg=30)
    for result in (twice, chunked):
        assert torch.equal(result[0], alone[0])
        torch.testing.assert_close(result[1], alone[1])


def test_dense_windows_resize_patch_scores_bilinearly():
    patch_scores = torch.tensor([[[0.2, 0.8]], [[0.8, 0.2]]])  # [C=2, 1, 2]
    labels, scores = combine_windows([DenseWindowScores((0, 0, 1, 4), -math.inf, patch_scores)], 1, 4, num_fg=2)
    assert labels.tolist() == [[2, 2, 1, 1]]
    torch.testing.assert_close(scores, torch.tensor([[0.8, 0.65, 0.65, 0.8]]))


def test_maskclip_features_are_the_last_block_with_self_only_attention(clip):
    """At CLIP's own input size, MaskCLIP's value path equals open_clip's forward with an attention mask that
    lets each token attend only to itself (softmax over one key = 1, so attention returns its own value)."""
    visual = clip[1].visual
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features, grid = dense_features(visual, images)
        tokens = visual._embeds(images)
        for block in visual.transformer.resblocks[:-1]:
            tokens = block(tokens)
        self_only = torch.full((17, 17), -math.inf).fill_diagonal_(0.0)
        tokens = visual.transformer.resblocks[-1](tokens, attn_mask=self_only)
        expected = visual.ln_post(tokens[:, 1:]) @ visual.proj
    assert features.shape == (2, 4 * 4, 32) and grid == (4, 4)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        other, other_grid = dense_features(visual, torch.randn(1, 3, 48, 64))  # positions resized to 6 x 8
    assert other.shape == (1, 6 * 8, 32) and other_grid == (6, 8)


def test_zeroseg_whole_mode_labels_pixels_by_their_group_through_the_composed_assignments(clip, text, student):
    logit_scale = clip[1].logit_scale.item()
    rule = LabelingRule(text, logit_scale, bg_threshold=0.06, name="softmax")
    seg = segmenter(ZeroSegScorer(student), rule, mode="whole", short_side=64)
    image = Image.open(PHOTO).convert("RGB")
    result = seg.segment(image)
    assert result.labels.shape == (366, 500) and result.scores.shape == (366, 500)

    with torch.no_grad():
        out = student(seg.prepare(image)[None], mask_ratio=0.0)
    groups = compose_assignments(out.soft_assignments, out.grid_size, (366, 500))[0]  # [G, H, W]
    expected = labels_by_group(class_scores(out.g[0], text, logit_scale), 0.06)[groups.argmax(dim=0)]
    assert np.array_equal(result.labels, expected.numpy())


def test_zeroseg_groupvit_rule_matches_the_numpy_transcription_with_the_image_embedding(clip, text, student):
    logit_scale = clip[1].logit_scale.item()
    image = Image.open(PHOTO).convert("RGB")
    found = []
    for threshold in (0.0, 0.35, 0.95):
        seg = segmenter(ZeroSegScorer(student), LabelingRule(text, logit_scale, threshold), mode="whole", short_side=64)
        with torch.no_grad():
            out = student(seg.prepare(image)[None], mask_ratio=0.0)
        owner = compose_assignments(out.soft_assignments, out.grid_size, (366, 500))[0].argmax(dim=0)  # [H, W]
        expected = numpy_groupvit_labels(
            out.g[0].double().numpy(), out.z[0].double().numpy(), text.double().numpy(), logit_scale, threshold,
            owner.flatten().numpy(),
        ).reshape(366, 500)  # fmt: skip
        labels = seg.segment(image).labels
        assert np.array_equal(labels, expected)
        found.append(set(np.unique(labels).tolist()))
    assert 0 not in found[0] and found[-1] == {0}  # the threshold decides, on the student's own scores


def test_background_threshold_none_and_keep_best_group(clip, text, student):
    image = Image.open(PHOTO).convert("RGB")
    logit_scale = clip[1].logit_scale.item()

    def labels(threshold, keep_best_group=False, mode="whole"):
        rule = LabelingRule(text, logit_scale, threshold, keep_best_group, name="softmax")
        return segmenter(ZeroSegScorer(student), rule, mode=mode, **SMALL).segment(image).labels

    assert (labels(None) > 0).all()
    assert (labels(1.1) == 0).all()
    assert (labels(1.1, keep_best_group=True) > 0).any()
    assert (labels(None, mode="slide") > 0).all()


def test_slide_with_one_window_equals_whole_and_maskclip_segments(clip, text, student):
    image = Image.open(PHOTO).convert("RGB")
    rule = LabelingRule(text, clip[1].logit_scale.item(), 0.06)
    whole = segmenter(ZeroSegScorer(student), rule, mode="whole", short_side=64).segment(image)
    one_window = segmenter(ZeroSegScorer(student), rule, mode="slide", short_side=64, crop_size=128).segment(image)
    assert np.array_equal(whole.labels, one_window.labels)

    for mode in ("whole", "slide"):
        result = segmenter(DenseClipScorer(clip[1].visual), rule, mode=mode, **SMALL).segment(image)
        assert result.labels.shape == (366, 500) and 0 <= result.labels.min() and result.labels.max() <= 20
        segments = describe_segments(result, VOC_CLASS_NAMES)
        assert math.isclose(sum(s["pixel_share"] for s in segments), 1.0)
        assert all((s["score"] is None) == (s["index"] == 0) for s in segments)
