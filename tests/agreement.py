"""The agreement of zs-eval with the references of tests/published_reference.py on the tiny random-weight
models: generated images (smooth random colours, sides not multiples of the patch), VOC's vocabulary, each
method's geometry at half size (the tiny towers' patch is 8, not 16).

    PYTHONPATH=. python -m tests.agreement [zeroseg|sclip|clearclip|naclip [whole|slide]]
"""

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SIZES = ((181, 250), (243, 173), (203, 203))
MEAN, STD = (0.5,) * 3, (0.25,) * 3
# method: short side, crop, stride, temperature, threshold, names file (VOC), as their configs at half size
PEERS = {
    "sclip": (168, 112, 56, 65.0, 0.1, "sclip_voc"),
    "clearclip": (224, 224, 112, 50.0, 0.5, "clearclip_voc"),
    "naclip": (168, 112, 56, 40.0, 0.1, "sclip_voc"),
}


def images(seed: int = 0) -> list[np.ndarray]:
    """[H, W, 3] uint8 images: 5 x 6 random colours resized bicubically, plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for height, width in SIZES:
        coarse = torch.rand(1, 3, 5, 6, generator=generator) * 255
        smooth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
        noisy = smooth + 8 * torch.randn(smooth.shape, generator=generator)
        out.append(noisy.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    return out


def query_lists(lines) -> tuple[list[str], list[int]]:
    """SCLIP's get_cls_idx: names split on ', ', each with the index of its line."""
    names, classes = [], []
    for index, line in enumerate(lines):
        parts = line.split(", ")
        names += parts
        classes += [index] * len(parts)
    return names, classes


def agreement(method: str, mode: str) -> float:
    """Mean share of pixels on which zs-eval's labels equal the reference's, over the generated images."""
    from tests import published_reference as reference
    from tests.conftest import TINY_TEACHER
    from zeroseg.evaluation.datasets import VOC_CLASS_NAMES
    from zeroseg.evaluation.labeling_rule import LabelingRule
    from zeroseg.evaluation.loading import read_names_file
    from zeroseg.evaluation.segmenter import DenseClipScorer, WindowSegmenter, ZeroSegScorer
    from zeroseg.evaluation.text import class_text_embeddings
    from zeroseg.evaluation.windows import Geometry
    from zeroseg.pipeline.teacher import create_clip, resolve_identity
    from zeroseg.trainer.model import ZeroSeg
    from zeroseg.trainer.model_config import model_preset

    torch.manual_seed(0)
    identity = resolve_identity(str(TINY_TEACHER), "none")
    clip = create_clip(identity, torch.device("cpu")).eval()
    torch.manual_seed(0)
    student = ZeroSeg(model_preset("tiny")).eval()

    def embed(names):
        return class_text_embeddings(clip, identity, list(names))

    shares = []
    for pixels in images():
        if method == "zeroseg":
            text, scale = embed(VOC_CLASS_NAMES[1:]), clip.logit_scale.item()
            rule, scorer, geometry = LabelingRule(text, scale, 0.1), ZeroSegScorer(student), (224, 224, 112)
            theirs = reference.groupvit_labels(student, text, scale, 0.1, pixels, mode, 224, 224, 112, 8)
        else:
            short, crop, stride, temperature, threshold, names_file = PEERS[method]
            lines = read_names_file(names_file, 21)
            names, query_class = query_lists([", ".join(line) for line in lines])
            background = len(lines[0])
            rule = LabelingRule(
                embed(names[background:]), math.log(temperature), threshold, name="softmax",
                background_names=tuple(lines[0]), background_text=embed(lines[0]),
                query_class=tuple(query_class[background:]), area_threshold=0.1 if method == "sclip" else None,
                pamr_steps=10 if method == "naclip" else 0,
            )  # fmt: skip
            pad = method == "clearclip" and mode == "slide"
            scorer, geometry = DenseClipScorer(clip.visual, method, pad_windows=pad), (short, crop, stride)
            theirs = reference.peer_labels(
                clip.visual, embed(names), query_class, pixels, method, mode, short, crop, stride, temperature,
                threshold, MEAN, STD, area_thd=rule.area_threshold, pamr_steps=rule.pamr_steps, pad=pad,
            )  # fmt: skip
        short, crop, stride = geometry
        segmenter = WindowSegmenter(scorer, rule, Geometry(mode, short, 2048, crop, stride), MEAN, STD, "cpu")
        shares.append((segmenter.segment(Image.fromarray(pixels)).labels == theirs).mean())
    return float(np.mean(shares))


if __name__ == "__main__":
    methods = sys.argv[1:2] or ["zeroseg", *PEERS]
    for name in methods:
        for mode in sys.argv[2:3] or ["whole", "slide"]:
            print(f"{name:<10} {mode:<6} {100 * agreement(name, mode):.3f}%", flush=True)
