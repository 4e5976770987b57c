"""The test-time segmenter: geometry, the window decision rule, MaskCLIP's dense features, ZeroSeg labeling."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_TEACHER, VOC_ROOT
from zeroseg.evaluation.datasets import VOC_CLASS_NAMES
from zeroseg.evaluation.dense_clip import dense_features
from zeroseg.evaluation.labeling_rule import LabelingRule
from zeroseg.evaluation.segmenter import DenseClipScorer, WindowSegmenter, ZeroSegScorer, describe_segments
from zeroseg.evaluation.text import class_text_embeddings
from zeroseg.evaluation.windows import Geometry
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
