"""The segmenter: a PIL image in, a label map of the vocabulary out (0 background, k = class k).

    image --(evaluation.windows geometry, normalise)--> windows [N, 3, h, w]
          --(scorer)--> per-window class scores over the window's footprint
          --(evaluation.windows.combine_windows)--> labels [H, W] at the image's own size

Scorers:
- ZeroSeg (`ZeroSegScorer`): the student sees all patches; each segment token g_i scores every class
  (`LabelingRule.scores`); the soft group assignments of its grouping stages, chained and resized
  bilinearly to the footprint (labeling.compose_assignments), give every pixel its argmax group, and
  the pixel scores as that group.
- MaskCLIP (`MaskClipScorer`): each patch token of evaluation.maskclip scores every class; the
  per-class patch score maps are resized bilinearly to the footprint.
Both use one scoring rule and one background rule, `LabelingRule`.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from zeroseg.evaluation.labeling import class_scores, compose_assignments
from zeroseg.evaluation.maskclip import check_maskclip_tower, maskclip_features
from zeroseg.evaluation.windows import (
    DenseWindowScores,
    Geometry,
    GroupWindowScores,
    Window,
    WindowScores,
    combine_windows,
    plan_windows,
    resized_shape,
    window_threshold,
)
from zeroseg.trainer.model import ZeroSeg


@dataclass
class LabelingRule:
    """How embeddings become class scores and when a window's pixel is background.

    score(embedding, class c) = softmax over the foreground classes of cosine * min(exp(logit_scale), 100)
    (the plain cosine when logit_scale is None). Background value of a window: bg_threshold, or
    min(bg_threshold, best score in the window) with keep_best_group; None = no background at all.
    """

    text: torch.Tensor  # [C_fg, D] class text embeddings
    logit_scale: float | None
    bg_threshold: float | None
    keep_best_group: bool = False

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., C_fg]."""
        return class_scores(embeddings, self.text.to(embeddings.device), self.logit_scale)

    def threshold(self, scores: torch.Tensor) -> float:
        return window_threshold(scores, self.bg_threshold, self.keep_best_group)

    def to_dict(self) -> dict:
        return {
            "score": "cosine" if self.logit_scale is None else "softmax(cosine * min(exp(logit_scale), 100))",
            "logit_scale": self.logit_scale,
            "bg_threshold": self.bg_threshold,
            "keep_best_group": self.keep_best_group,
        }


class Scorer(Protocol):
    patch_size: int

    def windows(self, batch: torch.Tensor, boxes: Sequence[tuple], rule: LabelingRule) -> list[WindowScores]:
        """batch [N, 3, h, w] of windows, boxes their N footprints (top, left, height, width)."""


class ZeroSegScorer:
    def __init__(self, model: ZeroSeg):
        self.model = model.eval()
        self.patch_size = model.cfg.patch_size

    @torch.inference_mode()
    def windows(self, batch: torch.Tensor, boxes: Sequence[tuple], rule: LabelingRule) -> list[WindowScores]:
        out = self.model(batch, mask_ratio=0.0)
        scores = rule.scores(out.g)  # [N, G, C_fg]
        result = []
        for index, box in enumerate(boxes):
            soft_maps = [stage_map[index : index + 1].float() for stage_map in out.soft_assignments]
            owner = compose_assignments(soft_maps, out.grid_size, box[2:])[0].argmax(dim=0)  # [h, w]
            result.append(GroupWindowScores(box, rule.threshold(scores[index]), owner, scores[index]))
        return result


class MaskClipScorer:
    def __init__(self, visual: torch.nn.Module):
        check_maskclip_tower(visual)
        self.visual = visual.eval()
        self.patch_size = int(visual.patch_size[0])

    @torch.inference_mode()
    def windows(self, batch: torch.Tensor, boxes: Sequence[tuple], rule: LabelingRule) -> list[WindowScores]:
        features, (rows, cols) = maskclip_features(self.visual, batch)  # [N, h*w, D]
        scores = rule.scores(features)  # [N, h*w, C_fg]
        patch_maps = scores.transpose(1, 2).reshape(len(batch), -1, rows, cols)  # [N, C_fg, h, w]
        return [
            DenseWindowScores(box, rule.threshold(scores[index]), patch_maps[index]) for index, box in enumerate(boxes)
        ]


@dataclass
class Segmentation:
    labels: np.ndarray  # [H, W] int64: 0 background, k = class k of the vocabulary
    scores: np.ndarray  # [H, W] float32: the pixel's best (window-averaged) foreground score


class WindowSegmenter:
    """Segments PIL images with a scorer, a labeling rule and a geometry; `window_batch` windows per forward."""

    def __init__(
        self,
        scorer: Scorer,
        rule: LabelingRule,
        geometry: Geometry,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        window_batch: int = 8,
    ):
        self.scorer = scorer
        self.rule = rule
        self.geometry = geometry
        self.device = device
        self.window_batch = window_batch
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """The resized, normalised image [3, H', W'] on the device (bicubic resize)."""
        rows, cols = resized_shape(image.height, image.width, self.geometry, self.scorer.patch_size)
        pixels = np.array(image.convert("RGB").resize((cols, rows), Image.Resampling.BICUBIC))  # [H', W', 3]
        tensor = torch.from_numpy(pixels).to(self.device).permute(2, 0, 1).float() / 255.0
        return (tensor - self.mean) / self.std

    def segment(self, image: Image.Image) -> Segmentation:
        pixels = self.prepare(image)  # [3, H', W']
        plan = plan_windows((image.height, image.width), tuple(pixels.shape[1:]), self.geometry)
        windows: list[WindowScores] = []
        for start in range(0, len(plan), self.window_batch):
            chunk = plan[start : start + self.window_batch]
            crops = [pixels[:, top : top + rows, left : left + cols] for top, left, rows, cols in _resized(chunk)]
            batch = torch.stack(crops)  # [N, 3, h, w]
            windows += self.scorer.windows(batch, [w.original for w in chunk], self.rule)
        labels, scores = combine_windows(windows, image.height, image.width, len(self.rule.text))
        return Segmentation(labels.cpu().numpy(), scores.float().cpu().numpy())


def _resized(windows: Sequence[Window]) -> list[tuple[int, int, int, int]]:
    return [window.resized for window in windows]


def describe_segments(segmentation: Segmentation, class_names: Sequence[str]) -> list[dict]:
    """One entry per class present, largest first: class, index, pixel share (0..1), and score (the mean
    over its pixels of their winning foreground score; None for background)."""
    labels = segmentation.labels
    indices, counts = np.unique(labels, return_counts=True)
    segments = []
    for index, count in sorted(zip(indices.tolist(), counts.tolist()), key=lambda item: -item[1]):
        score = None if index == 0 else float(segmentation.scores[labels == index].mean())
        segments.append(
            {"class": class_names[index], "index": index, "pixel_share": count / labels.size, "score": score}
        )
    return segments
