"""zs-eval against the published code, step by step (issue 24): mmcv's resize size, mmseg's windows and
fusion order, SCLIP's positional-embedding sampling, the dense methods' softmax order with synonyms and
area filter, NACLIP's PAMR, the name files, and whole pipelines against tests/published_reference.py."""

import math
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image

from tests import published_reference as reference
from tests.agreement import images, query_lists
from tests.conftest import TINY_TEACHER
from zeroseg.errors import UserError
from zeroseg.evaluation.datasets import DATASETS, VOC_CLASS_NAMES, SegmentationDataset
from zeroseg.evaluation.dense_clip import resized_positional_embedding
from zeroseg.evaluation.labeling_rule import DenseWindow, GroupWindow, LabelingRule, fused_channels
from zeroseg.evaluation.loading import LoadedModel, ModelOptions, read_names_file
from zeroseg.evaluation.methods import METHODS, PerDataset
from zeroseg.evaluation.refinement import pamr
from zeroseg.evaluation.segmenter import DenseClipScorer, WindowSegmenter, ZeroSegScorer
from zeroseg.evaluation.text import class_text_embeddings
from zeroseg.evaluation.windows import Geometry, resized_shape, window_starts
from zeroseg.pipeline.teacher import create_clip, resolve_identity
from zeroseg.trainer.model import ZeroSeg
from zeroseg.trainer.model_config import model_preset


def test_resize_is_mmcv_keep_ratio_without_rounding_to_the_patch():
    # scale = min(448 / 366, 2048 / 500); sides int(side * scale + 0.5): 612.5 -> 612, not a multiple of 16
    assert resized_shape(366, 500, Geometry()) == (448, 612)
    # the long side caps: scale = 2048 / 1000 = 2.048; 100 * 2.048 + 0.5 = 205.3 -> 205
    assert resized_shape(100, 1000, Geometry()) == (205, 2048)


def test_slide_windows_are_mmsegs():
    # h_grids = max(L - crop + stride - 1, 0) // stride + 1; start = max(min(i * stride + crop, L) - crop, 0)
    assert window_starts(1000, 448, 224) == [0, 224, 448, 552]
    assert window_starts(612, 448, 224) == [0, 164]
    assert window_starts(448, 448, 224) == [0] and window_starts(300, 448, 224) == [0]


def test_windows_fuse_on_the_resized_image_then_one_bilinear_resize():
    # canvas 1 x 3, windows over columns 0-1 and 1-2: sum [1, 3 + 5, 7] / count [1, 2, 1] = [1, 4, 7];
    # to width 6, align_corners=False: sources -0.25, 0.25, 0.75, 1.25, 1.75, 2.25 (clamped at the ends)
    owner = torch.zeros(1, 2, dtype=torch.int64)
    left = GroupWindow((0, 0, 1, 2), torch.tensor([[0, 1]]), torch.tensor([[1.0], [3.0]]))
    right = GroupWindow((0, 1, 1, 2), owner + torch.tensor([[0, 1]]), torch.tensor([[5.0], [7.0]]))
    fused = fused_channels([left, right], (1, 3), (1, 6))(0, 1)[0, 0]
    assert torch.allclose(fused, torch.tensor([1.0, 1.75, 3.25, 4.75, 6.25, 7.0]))


def _bicubic_at(values: list[float], source: float, a: float = -0.75) -> float:
    """Keys' cubic convolution (a = -0.75, PyTorch's bicubic) of `values` at `source`, border taps clamped."""

    def weight(x: float) -> float:
        x = abs(x)
        return (a + 2) * x**3 - (a + 3) * x**2 + 1 if x <= 1 else (a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a)

    base = math.floor(source)
    taps = range(base - 1, base + 3)
    return sum(values[min(max(k, 0), len(values) - 1)] * weight(source - k) for k in taps)


def test_positional_embedding_is_sampled_with_scale_factor_n_plus_a_tenth():
    # a channel equal to the row index squared of a 4 x 4 grid, resampled to 6 rows: SCLIP's code samples row i at
    # (i + 1/2) / ((6 + 0.1) / 4) - 1/2 (scale_factor), not at (i + 1/2) * 4 / 6 - 1/2 (a target size)
    class Visual(torch.nn.Module):
        grid_size = (4, 4)

    visual = Visual()
    rows = [0.0, 1.0, 4.0, 9.0]
    visual.positional_embedding = torch.cat([torch.zeros(1, 1), torch.tensor(rows).repeat_interleave(4)[:, None]])
    resized = resized_positional_embedding(visual, (6, 5))[1:, 0].view(6, 5)
    for i in range(6):
        assert math.isclose(resized[i, 2].item(), _bicubic_at(rows, (i + 0.5) / (6.1 / 4) - 0.5), abs_tol=1e-5)
    assert not math.isclose(resized[2, 2].item(), _bicubic_at(rows, (2 + 0.5) * 4 / 6 - 0.5), abs_tol=1e-3)


def test_dense_order_softmax_after_fusion_max_over_names_and_area_filter():
    # one pixel-wide canvas of 10 pixels; queries: background 'bg', class 1 'a', 'a2', class 2 'b'
    text = torch.eye(4)
    rule = LabelingRule(text[1:], math.log(10.0), 0.3, name="softmax", background_names=("bg",),
                        background_text=text[:1], query_class=(1, 1, 2))  # fmt: skip
    cosines = torch.zeros(4, 1, 10)
    cosines[2, 0, :9] = 0.5  # 'a2' wins 9 pixels
    cosines[3, 0, 9] = 0.4  # 'b' wins the last one
    window = DenseWindow((0, 0, 1, 10), cosines, (1, 10))
    labels, score = rule.decide([window], (1, 10), (1, 10))
    # softmax of 10 * [0, 0, 5, 0] over the 4 queries: e^5 / (3 + e^5); class 1's score is its best name's
    assert labels[0].tolist() == [1] * 9 + [2]
    assert math.isclose(score[0, 0].item(), math.exp(5) / (3 + math.exp(5)), rel_tol=1e-5)
    # SCLIP's area_thd 0.2: class 2 covers 1 / 10 of the foreground and loses its score: its pixel takes its next
    # best, background or class 1 at e^0 / (3 + e^4), below 0.3 -> background
    rule.area_threshold = 0.2
    labels, _ = rule.decide([window], (1, 10), (1, 10))
    assert labels[0].tolist() == [1] * 9 + [0]


def test_pamr_is_nacliPs_kernels():
    generator = torch.Generator().manual_seed(0)
    image, masks = torch.rand(3, 20, 24, generator=generator), torch.rand(5, 20, 24, generator=generator)
    expected = reference.pamr(image[None], masks[None], steps=3, dilations=(1, 2))[0]
    assert torch.allclose(pamr(image, masks, 3, (1, 2)), expected, atol=1e-5)


def test_each_methods_name_files_with_synonyms():
    voc = read_names_file("sclip_voc", 21)
    assert len(voc[0]) == 26 and voc[4] == ["ship"] and len(voc[15]) == 7 and len(voc[20]) == 5
    assert read_names_file("clearclip_voc", 21)[0] == ["background"]
    assert len(read_names_file("sclip_coco", 81)[1]) == 8 and len(read_names_file("sclip_context", 60)) == 60
    voc20 = read_names_file("sclip_voc20", 20)  # no background line: line 0 is class 0
    assert voc20[0] == ["aeroplane"] and len(voc20[14]) == 7 and len(voc20[19]) == 5
    assert all(len(line) == 1 for line in read_names_file("clearclip_voc20", 20))


def test_every_shipped_name_file_has_one_line_per_class_of_its_benchmark():
    shipped = {path.name for path in (resources.files("zeroseg.evaluation") / "names").iterdir()}
    used = set()
    for method in METHODS.values():
        for dataset, stem in method.names.by_dataset.items() if isinstance(method.names, PerDataset) else ():
            spec = DATASETS[dataset]
            lines = read_names_file(stem, len(spec.class_names))  # background line 0 where the benchmark has one
            assert (lines[0][0] in ("sky", "background")) == spec.has_background, stem
            used.add(f"{stem}.txt")
    assert used == shipped


def test_a_name_file_of_another_line_count_is_refused_in_one_line():
    for stem, count in (("sclip_voc", 20), ("sclip_ade20k", 151)):  # a missing / an extra background line
        with pytest.raises(UserError) as refused:
            read_names_file(stem, count)
        message = str(refused.value)
        assert "names file " in message and f"{stem}.txt: " in message and "\n" not in message
        assert f"lines, but the benchmark has {count} classes" in message


def test_a_peer_scores_a_class_as_the_max_over_its_names_on_a_benchmark_without_background(tiny, tmp_path):
    identity, clip, _ = tiny
    options = ModelOptions("sclip", teacher=str(TINY_TEACHER), text_cache=str(tmp_path))
    loaded = LoadedModel(DenseClipScorer(clip.visual, "sclip"), (0.5,) * 3, (0.25,) * 3, clip, identity,
                         ("a photo of a {}.",), options, torch.device("cpu"), {})  # fmt: skip
    rule = loaded.segmenter(DATASETS["voc20"].class_names, None, "voc20", background=False).rule
    lines = read_names_file("sclip_voc20", 20)
    assert rule.query_class == tuple(k for k, line in enumerate(lines, 1) for _ in line)
    assert rule.background_names == () and len(rule.text) == 30  # 18 single names, person 7, tvmonitor 5
    person = [query for query, k in enumerate(rule.query_class) if k == 15]  # voc20 class 14
    cosines = torch.zeros(30, 1, 2)
    cosines[person[3], 0, 0] = 0.5  # 'person in dress' alone wins pixel 0
    cosines[person, 0, 1] = 0.5  # every name of person, and 'aeroplane' a little higher: the max over names
    cosines[0, 0, 1] = 0.52  # picks aeroplane (a sum over person's 7 names would pick person)
    labels, score = rule.decide([DenseWindow((0, 0, 1, 2), cosines, (1, 2))], (1, 2), (1, 2))
    assert labels[0].tolist() == [14, 0]
    # softmax of 40 * cosines (SCLIP's logit scale 40 on voc20) over the 30 names: e^20 / (29 + e^20)
    assert math.isclose(score[0, 0].item(), math.exp(20) / (29 + math.exp(20)), rel_tol=1e-5)


def test_groupvits_config_thresholds_are_one_option_away():
    def threshold(dataset: str, thresholds: str) -> float:
        options = ModelOptions("zeroseg", checkpoint="run.pt", thresholds=thresholds)
        loaded = LoadedModel(None, (), (), None, None, (), options, torch.device("cpu"), {})
        spec = DATASETS[dataset]
        return loaded.default_bg_threshold(SegmentationDataset(dataset, [], spec.class_names, spec.bg_threshold))

    assert [threshold(name, "paper") for name in ("voc", "context", "coco")] == [0.95, 0.05, 0.35]
    assert [threshold(name, "groupvit") for name in ("voc", "context", "coco")] == [0.95, 0.35, 0.95]


def test_thresholds_and_rule_options_are_checked():
    with pytest.raises(UserError, match="--thresholds 'ours'"):
        ModelOptions("zeroseg", checkpoint="x", thresholds="ours")
    with pytest.raises(UserError, match="--rule groupvit is ZeroSeg's"):
        ModelOptions("sclip", teacher="x", rule="groupvit")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    identity = resolve_identity(str(TINY_TEACHER), "none")
    clip = create_clip(identity, torch.device("cpu")).eval()
    torch.manual_seed(0)
    return identity, clip, ZeroSeg(model_preset("tiny")).eval()


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_zeroseg_follows_groupvits_pipeline(tiny, tmp_path, mode):
    identity, clip, student = tiny
    text = class_text_embeddings(clip, identity, VOC_CLASS_NAMES[1:], cache_dir=tmp_path)
    pixels = images()[1][:120, :90]
    logit_scale = clip.logit_scale.item()
    geometry = Geometry(mode, 112, 2048, 112, 56)
    seg = WindowSegmenter(ZeroSegScorer(student), LabelingRule(text, logit_scale, 0.1), geometry, (0.5,) * 3,
                          (0.25,) * 3, torch.device("cpu"))  # fmt: skip
    ours = seg.segment(Image.fromarray(pixels)).labels
    theirs = reference.groupvit_labels(student, text, logit_scale, 0.1, pixels, mode, 112, 112, 56, 8)
    assert len(np.unique(theirs)) > 1 and (ours == theirs).mean() > 0.999


@pytest.mark.parametrize("method", ["sclip", "naclip", "clearclip"])
def test_peers_follow_their_code(tiny, tmp_path, method):
    identity, clip, _ = tiny
    lines = read_names_file("clearclip_voc" if method == "clearclip" else "sclip_voc", 21)
    names, query_class = query_lists([", ".join(line) for line in lines])

    def embed(words):
        return class_text_embeddings(clip, identity, list(words), cache_dir=tmp_path)

    rule = LabelingRule(embed(names[len(lines[0]) :]), math.log(50.0), 0.1, name="softmax",
                        background_names=tuple(lines[0]), background_text=embed(lines[0]),
                        query_class=tuple(query_class[len(lines[0]) :]),
                        area_threshold=0.1 if method == "sclip" else None,
                        pamr_steps=10 if method == "naclip" else 0)  # fmt: skip
    pixels = images()[0][:70, :100]
    scorer = DenseClipScorer(clip.visual, method, pad_windows=method == "clearclip")
    seg = WindowSegmenter(scorer, rule, Geometry("slide", 60, 2048, 40, 20), (0.5,) * 3, (0.25,) * 3,
                          torch.device("cpu"))  # fmt: skip
    ours = seg.segment(Image.fromarray(pixels)).labels
    theirs = reference.peer_labels(
        clip.visual, embed(names), query_class, pixels, method, "slide", 60, 40, 20, 50.0, 0.1, (0.5,) * 3,
        (0.25,) * 3, area_thd=0.1 if method == "sclip" else None, pamr_steps=10 if method == "naclip" else 0,
        pad=method == "clearclip",
    )  # fmt: skip
    assert (ours == theirs).mean() > 0.999
