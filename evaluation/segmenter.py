"""The segmenter: a PIL image in, a label map of the vocabulary out (0 background, k = class k).

    image --(evaluation.windows geometry, normalise)--> windows [N, 3, h, w]
          --(scorer)--> per-window class scores over the window's footprint
          --(LabelingRule.decide)--> labels [H, W] at the image's own size

Scorers (the rule itself, scores, prior, background and window fusion, is evaluation.labeling_rule):
- ZeroSeg (`ZeroSegScorer`): the student sees all patches; its segment tokens g and image embedding z
  score every class (`LabelingRule.group_scores`); the soft group assignments of its grouping stages,
  chained and resized bilinearly to the footprint, give every pixel its argmax group (`group_window`).
- MaskCLIP, SCLIP, ClearCLIP, NACLIP (`DenseClipScorer`), dense scorers: each patch token of
  evaluation.dense_clip scores every class (`LabelingRule.dense_scores`); the per-class patch score maps
  [C_fg, h, w], and with background names (SCLIP's protocol) the background class's probability map
  [h, w], go to `LabelingRule.dense_window`.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from zeroseg.evaluation.dense_clip import check_vit_tower, dense_features
from zeroseg.evaluation.labeling_rule import LabelingRule, WindowScores, compose_assignments
from zeroseg.evaluation.windows import Geometry, Window, plan_windows, resized_shape
from zeroseg.trainer.model import ZeroSeg


class Scorer(Protocol):
    patch_size: int

    def windows(self, batch: torch.Tensor, boxes: Sequence[tuple], rule: LabelingRule) -> list[WindowScores]:
        """batch [N, 3, h, w] of windows, boxes their N footprints (top, left, height, width)."""


class ZeroSegScorer:
    """The student's windows; on CUDA its forward runs under bf16 autocast (as in training), the scores in fp32."""

    def __init__(self, model: ZeroSeg, bf16: bool = True):
        self.model = model.eval()
        self.patch_size = model.cfg.patch_size
        self.bf16 = bf16

    @torch.inference_mode()
    def windows(self, batch: torch.Tensor, boxes: Sequence[tuple], rule: LabelingRule) -> list[WindowScores]:
        on_cuda = batch.device.type == "cuda"
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=self.bf16 and on_cuda):
            out = self.model(batch, mask_ratio=0.0)
        scores = rule.group_scores(out.g.float(), out.z.float())  # [N, G, C_fg]
        result = []
        for index, box in enumerate(boxes):
            soft_maps = [stage_map[index : index + 1].float() for stage_map in out.soft_assignments]
            owner = compose_assignments(soft_maps, out.grid_size, box[2:])[0].argmax(dim=0)  # [h, w]
            result.append(rule.group_window(box, owner, scores[index]))
        return result


class DenseClipScorer:
    """A CLIP image tower with its last block changed by `method` (evaluation.dense_clip; gaussian_std None: the
    method's)."""

    def __init__(self, visual: torch.nn.Module, method: str = "maskclip", gaussian_std: float | None = None):
        check_vit_tower(visual, method)
        self.visual = visual.eval()
        self.method = method
        self.gaussian_std = gaussian_std
        self.patch_size = int(visual.patch_size[0])

    @torch.inference_mode()
    def windows(self, batch: torch.Tensor, boxes: Sequence[tuple], rule: LabelingRule) -> list[WindowScores]:
        features, (rows, cols) = dense_features(self.visual, batch, self.method, self.gaussian_std)  # [N, h*w, D]
        scores, background = rule.dense_scores(features)  # [N, h*w, C_fg], [N, h*w] or None
        patch_maps = scores.transpose(1, 2).reshape(len(batch), -1, rows, cols)  # [N, C_fg, h, w]
        if background is None:
            return [rule.dense_window(box, patch_maps[index]) for index, box in enumerate(boxes)]
        background_maps = background.view(len(batch), rows, cols)  # [N, h, w]
        return [rule.dense_window(box, patch_maps[i], background_maps[i]) for i, box in enumerate(boxes)]


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
        labels, scores = self.rule.decide(windows, image.height, image.width)
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
