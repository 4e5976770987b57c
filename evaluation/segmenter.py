"""The segmenter: a PIL image in, a label map of the vocabulary out (0 background, k = class k).

    image --(evaluation.windows: mmcv keep-ratio bilinear resize, normalise)--> resized image [3, H', W']
          --(evaluation.windows: whole, or mmseg's slide windows)--> windows [N, 3, h, w]
          --(scorer)--> per-window channel maps at the window's size on the resized image
          --(LabelingRule.decide: fused there, resized once to the original size)--> labels [H, W]

Scorers (the rule itself, scores, prior, background, fusion and decision, is evaluation.labeling_rule):
- ZeroSeg (`ZeroSegScorer`, GroupViT's `encode_decode`): the student sees the window cut to a multiple of
  the patch (GroupViT's patch convolution drops the rest), its segment tokens g and image embedding z
  score every class, and the soft group assignments of its grouping stages, chained and resized
  bilinearly to the whole window, give every window pixel its argmax group.
- MaskCLIP, SCLIP, ClearCLIP, NACLIP (`DenseClipScorer`, their `forward_feature`): each patch token of
  evaluation.dense_clip has a cosine with every query (class names and background names); the maps
  [Q, h_tokens, w_tokens] are resized bilinearly to the window. The patch convolution drops a remainder
  that is not a multiple of the patch, as their code does, except with `pad_windows` (ClearCLIP's
  forward_slide): the window is zero-padded evenly to the patch grid and the maps cut back.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from zeroseg.evaluation.dense_clip import check_vit_tower, dense_features
from zeroseg.evaluation.labeling_rule import DenseWindow, GroupWindow, LabelingRule, compose_assignments
from zeroseg.evaluation.windows import Geometry, plan_windows, resized_shape
from zeroseg.trainer.model import ZeroSeg


class Scorer(Protocol):
    patch_size: int

    def windows(self, batch: torch.Tensor, boxes: Sequence[tuple], rule: LabelingRule) -> list:
        """batch [N, 3, h, w] of windows, boxes their N places (top, left, height, width) on the resized image."""


class ZeroSegScorer:
    """The student's windows; on CUDA its forward runs under bf16 autocast (as in training), the scores in fp32."""

    def __init__(self, model: ZeroSeg, bf16: bool = True):
        self.model = model.eval()
        self.patch_size = model.cfg.patch_size
        self.bf16 = bf16

    @torch.inference_mode()
    def windows(self, batch: torch.Tensor, boxes: Sequence[tuple], rule: LabelingRule) -> list[GroupWindow]:
        rows, cols = batch.shape[-2:]
        seen = batch[..., : rows // self.patch_size * self.patch_size, : cols // self.patch_size * self.patch_size]
        on_cuda = batch.device.type == "cuda"
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=self.bf16 and on_cuda):
            out = self.model(seen, mask_ratio=0.0)
        soft_maps = [stage_map.float() for stage_map in out.soft_assignments]
        owners = compose_assignments(soft_maps, out.grid_size, (rows, cols)).argmax(dim=1)  # [N, h, w]
        tables = rule.group_tables(out.g.float(), out.z.float())  # [N, G, 1 + C_fg]
        return [GroupWindow(box, owners[index], tables[index]) for index, box in enumerate(boxes)]


class DenseClipScorer:
    """A CLIP image tower with its last block changed by `method` (evaluation.dense_clip; gaussian_std None: the
    method's); pad_windows: ClearCLIP's padding of a window to the patch grid."""

    def __init__(
        self, visual: torch.nn.Module, method: str = "maskclip", gaussian_std: float | None = None,
        pad_windows: bool = False,
    ):  # fmt: skip
        check_vit_tower(visual, method)
        self.visual = visual.eval()
        self.method = method
        self.gaussian_std = gaussian_std
        self.pad_windows = pad_windows
        self.patch_size = int(visual.patch_size[0])

    @torch.inference_mode()
    def windows(self, batch: torch.Tensor, boxes: Sequence[tuple], rule: LabelingRule) -> list[DenseWindow]:
        rows, cols = batch.shape[-2:]
        top, left, bottom, right = _even_padding(rows, cols, self.patch_size) if self.pad_windows else (0, 0, 0, 0)
        padded = F.pad(batch, (left, right, top, bottom)) if self.pad_windows else batch  # [N, 3, h + t + b, w + l + r]
        features, grid = dense_features(self.visual, padded, self.method, self.gaussian_std)
        logits = rule.dense_logits(features)  # [N, h*w, Q]
        maps = logits.transpose(1, 2).reshape(len(batch), -1, *grid)  # [N, Q, h_tokens, w_tokens]
        size = tuple(padded.shape[-2:])
        return [DenseWindow(box, maps[index], size, (top, left)) for index, box in enumerate(boxes)]


def _even_padding(rows: int, cols: int, patch: int) -> tuple[int, int, int, int]:
    """ClearCLIP's compute_padsize: (top, left, bottom, right) zeros up to the next multiple of the patch,
    the smaller half first."""
    height, width = -rows % patch, -cols % patch
    return height // 2, width // 2, height - height // 2, width - width // 2


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
        """The resized, normalised image [3, H', W'] on the device (mmcv's bilinear resize of the uint8 pixels)."""
        rows, cols = resized_shape(image.height, image.width, self.geometry)
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).to(self.device).permute(2, 0, 1)  # [3, H, W]
        resized = F.interpolate(pixels[None].float(), size=(rows, cols), mode="bilinear", align_corners=False)[0]
        tensor = resized.round().clamp(0, 255) / 255.0  # uint8, as cv2 keeps it
        return (tensor - self.mean) / self.std

    def segment(self, image: Image.Image) -> Segmentation:
        pixels = self.prepare(image)  # [3, H', W']
        canvas = tuple(pixels.shape[1:])
        plan = plan_windows(canvas, self.geometry)
        windows = []
        for start in range(0, len(plan), self.window_batch):
            chunk = plan[start : start + self.window_batch]
            batch = torch.stack([pixels[:, top : top + rows, left : left + cols] for top, left, rows, cols in chunk])
            windows += self.scorer.windows(batch, chunk, self.rule)  # batch [N, 3, h, w]
        original = (image.height, image.width)
        guide = None
        if self.rule.pamr_steps:
            guide = F.interpolate(pixels[None], size=original, mode="bilinear", align_corners=False)[0]
        labels, scores = self.rule.decide(windows, canvas, original, guide)
        return Segmentation(labels.cpu().numpy(), scores.float().cpu().numpy())


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
