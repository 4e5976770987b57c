"""The labeling rule of zero-shot evaluation, whole: embeddings -> class scores -> per-window pixel scores
-> one label per original pixel. Pure tensor functions, no model; the window geometry is evaluation.windows.

Label convention everywhere: 0 is background, k >= 1 is foreground class k, whose text embedding is
row k - 1 of the [C_fg, D] text matrix (the vocabulary without its background entry). Embeddings and
texts are L2-normalised here; s = min(exp(logit_scale), 100) and A = softmax over classes of cos * s.

Rule `groupvit` (default; GroupViT's `encode_decode`, the protocol behind the paper's Table 1), per window:
  A      = softmax_c(g t^T s)                                   [G, C_fg]  g: segment embeddings
  prior  = the top-k classes (k = min(top_k, C_fg)) of softmax_c(z t^T s), z the image embedding;
  A_top  = softmax_c of g t^T s with the other classes set to -inf [G, C_fg]
  P      = A_top * A                                              [G, C_fg]
  every pixel takes the row of P of its group (argmax of the composed soft assignment); its background
  channel is 1 where its best score < min(bg_threshold, max P), else 0 (so the best group never is).
  Windows are fused as mmseg's slide_inference: the [1 + C_fg, h, w] logits (background channel first)
  are summed where windows overlap and divided by the count; the pixel takes the argmax, background
  (index 0) winning ties as torch.argmax does.
  Dense scorers (MaskCLIP's per-patch scores [C_fg, h, w], no groups, no prior) give A per patch,
  resized bilinearly to the window; the background channel and the fusion are the same.

Rule `softmax` (the rule before GroupViT's was the default; kept to reproduce those numbers): the scores
are A (no prior, no product); a window's background value is bg_threshold, or min(bg_threshold, best
score of the window) with keep_best_group; scores and background values are averaged over the windows
covering a pixel, which takes its best class, or background where that is strictly below the averaged
background value.

Both: without bg_threshold no pixel is background; class ties go to the lower class index.

Vocabularies without a background class (`background=False`: voc20, context59, coco-stuff, cityscapes,
ade20k) have no threshold and no background names: every pixel takes its best class, labelled k - 1 for
foreground class k, so labels are the class indices 0..C_fg-1 of the vocabulary.

Background class (dense scorers with background names, SCLIP's protocol): the softmax runs over those
names and the foreground classes together; the background probability of a patch is the highest of
the names', resized bilinearly to the window, and a pixel's background value is the larger of that and
the window's threshold (`background_values`, a per-pixel [h, w] threshold; both rules compare it
elementwise with the pixel's best foreground score).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

RULES = ("groupvit", "softmax")
_ELEMENTS_PER_CHUNK = 1 << 24  # class-score elements held at once when averaging windows (64 MiB fp32)


def compose_assignments(
    soft_maps: Sequence[torch.Tensor], grid_hw: tuple[int, int], out_hw: tuple[int, int]
) -> torch.Tensor:
    """Chain the soft assignment maps of the grouping stages into per-pixel group scores.

    soft_maps: [B, h*w, G1] (tokens -> first-stage groups, row-major token grid), then [B, G1, G2],
    ... [B, G_{k-1}, Gk]. Their product [B, h*w, Gk] is reshaped to [B, Gk, h, w] and resized
    bilinearly (align_corners=False) to out_hw -> [B, Gk, H, W].
    """
    composed = soft_maps[0]  # [B, h*w, G1]
    for stage_map in soft_maps[1:]:
        composed = composed @ stage_map  # [B, h*w, G_next]
    height, width = grid_hw
    batch, tokens, groups = composed.shape
    if tokens != height * width:
        raise ValueError(f"assignment map has {tokens} tokens, grid {height}x{width} has {height * width}")
    grid = composed.transpose(1, 2).reshape(batch, groups, height, width)  # [B, G, h, w]
    return F.interpolate(grid, size=tuple(out_hw), mode="bilinear", align_corners=False)


def class_scores(
    embeddings: torch.Tensor, text_emb: torch.Tensor, logit_scale: float | torch.Tensor | None = None
) -> torch.Tensor:
    """[..., D] embeddings, [C_fg, D] text -> [..., C_fg] float32 scores, both sides L2-normalised here:
    the cosine, or with logit_scale A = the softmax over classes of cosine * min(exp(logit_scale), 100)."""
    cosine = F.normalize(embeddings.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T
    if logit_scale is None:
        return cosine
    return (cosine * _scale(logit_scale)).softmax(dim=-1)


def image_prior_scores(
    groups: torch.Tensor, image: torch.Tensor, text_emb: torch.Tensor, logit_scale: float, top_k: int
) -> torch.Tensor:
    """GroupViT's P = A_top * A of the module docstring: groups [N, G, D], image [N, D] -> [N, G, C_fg]."""
    text = F.normalize(text_emb.float(), dim=-1)  # [C_fg, D]
    logits = F.normalize(groups.float(), dim=-1) @ text.T * _scale(logit_scale)  # [N, G, C_fg]
    image_probs = (F.normalize(image.float(), dim=-1) @ text.T * _scale(logit_scale)).softmax(dim=-1)  # [N, C_fg]
    top = image_probs.topk(min(top_k, text.shape[0]), dim=-1).indices  # [N, k]
    in_prior = torch.zeros_like(image_probs, dtype=torch.bool).scatter_(-1, top, True)  # [N, C_fg]
    top_probs = logits.masked_fill(~in_prior[:, None, :], -math.inf).softmax(dim=-1)  # A_top [N, G, C_fg]
    return top_probs * logits.softmax(dim=-1)


def _scale(logit_scale: float | torch.Tensor) -> float:
    return min(math.exp(float(logit_scale)), 100.0)


class WindowScores(Protocol):
    """One window's class scores over its footprint `box` (top, left, height, width) of the original image."""

    box: tuple[int, int, int, int]
    threshold: float | torch.Tensor  # the window's background value, or one per pixel [h, w] (`background_values`)

    @property
    def device(self) -> torch.device: ...

    def class_scores(self, start: int, stop: int) -> torch.Tensor:
        """Scores of foreground classes start..stop-1 -> [stop - start, h, w]."""

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Best foreground score [h, w] and its class (0-based foreground index) [h, w]."""


@dataclass
class GroupWindowScores:
    """ZeroSeg: each pixel scores as the group that owns it (argmax of the composed soft assignment)."""

    box: tuple[int, int, int, int]
    threshold: float
    owner: torch.Tensor  # [h, w] int64 group index
    group_scores: torch.Tensor  # [G, C_fg]

    @property
    def device(self) -> torch.device:
        return self.owner.device

    def class_scores(self, start: int, stop: int) -> torch.Tensor:
        return self.group_scores[:, start:stop][self.owner].permute(2, 0, 1)  # [stop - start, h, w]

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        value, index = self.group_scores.max(dim=-1)  # [G], [G]
        return value[self.owner], index[self.owner]


@dataclass
class DenseWindowScores:
    """Dense scorers (MaskCLIP, SCLIP, ClearCLIP, NACLIP): per-patch scores resized bilinearly
    (align_corners=False) to the footprint."""

    box: tuple[int, int, int, int]
    threshold: float | torch.Tensor  # or per pixel [h, w] (`background_values`)
    patch_scores: torch.Tensor  # [C_fg, h_tokens, w_tokens]

    @property
    def device(self) -> torch.device:
        return self.patch_scores.device

    def class_scores(self, start: int, stop: int) -> torch.Tensor:
        size = self.box[2:]
        return F.interpolate(self.patch_scores[None, start:stop], size=size, mode="bilinear", align_corners=False)[0]

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _running_best(self.class_scores, len(self.patch_scores), self.box[2:], self.device)


def background_values(patch_background: torch.Tensor, box: tuple[int, int, int, int], threshold: float) -> torch.Tensor:
    """Per-pixel background values of a window whose background class scores patch_background [h_t, w_t]:
    those scores resized bilinearly to the footprint, raised to `threshold` where lower -> [h, w]."""
    resized = F.interpolate(patch_background[None, None], size=box[2:], mode="bilinear", align_corners=False)[0, 0]
    return resized.clamp(min=threshold)


def window_threshold(scores: torch.Tensor, bg_threshold: float | None, keep_best_group: bool) -> float:
    """The background value of a window whose groups (or patches) score `scores` [N, C_fg]:
    bg_threshold, capped at the best score of the window with keep_best_group (the window's best-scoring
    group is never background); -inf without threshold."""
    if bg_threshold is None:
        return -math.inf
    return min(bg_threshold, scores.max().item()) if keep_best_group else bg_threshold


def fuse_window_logits(
    windows: list[WindowScores], height: int, width: int, num_fg: int, with_background: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """groupvit's pixel decision and mmseg's window fusion (module docstring) -> labels [H, W] int64 and
    each pixel's best averaged foreground score [H, W] float32."""
    if len(windows) == 1:
        value, index = windows[0].best()
        background = (value < windows[0].threshold).float()  # [h, w] the 0/1 background channel
    else:
        count = _coverage(windows, height, width)
        background = torch.zeros(height, width, device=count.device)  # [H, W]
        for window in windows:
            top, left, rows, cols = window.box
            background[top : top + rows, left : left + cols] += (window.best()[0] < window.threshold).float()
        background = background / count
        value, index = _best_over_classes(windows, count, height, width, num_fg)
    if not with_background:
        return index + 1, value
    return torch.where(value <= background, 0, index + 1), value  # argmax over [background, classes]


def combine_windows(
    windows: list[WindowScores], height: int, width: int, num_fg: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax's pixel decision (module docstring): scores and background values averaged -> labels
    [H, W] int64 (0 background, k = foreground class k) and each pixel's best averaged score [H, W]."""
    if len(windows) == 1:
        value, index = windows[0].best()
        return torch.where(value < windows[0].threshold, 0, index + 1), value
    count = _coverage(windows, height, width)
    background = torch.zeros(height, width, device=count.device)  # [H, W]
    for window in windows:
        top, left, rows, cols = window.box
        background[top : top + rows, left : left + cols] += window.threshold
    value, index = _best_over_classes(windows, count, height, width, num_fg)
    return torch.where(value < background / count, 0, index + 1), value


def _coverage(windows: list[WindowScores], height: int, width: int) -> torch.Tensor:
    """[H, W] number of windows covering each pixel."""
    count = torch.zeros(height, width, device=windows[0].device)
    for window in windows:
        top, left, rows, cols = window.box
        count[top : top + rows, left : left + cols] += 1
    return count


def _best_over_classes(
    windows: list[WindowScores], count: torch.Tensor, height: int, width: int, num_fg: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and argmax over classes of the window-averaged scores [H, W]."""

    def averaged(start: int, stop: int) -> torch.Tensor:
        total = torch.zeros(stop - start, height, width, device=count.device)  # [chunk, H, W]
        for window in windows:
            top, left, rows, cols = window.box
            total[:, top : top + rows, left : left + cols] += window.class_scores(start, stop)
        return total / count

    return _running_best(averaged, num_fg, (height, width), count.device)


def _running_best(
    scores, num_fg: int, shape: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and argmax over classes of scores(start, stop) -> [stop - start, H, W], a chunk of classes at
    a time so that memory stays bounded for large vocabularies."""
    best = torch.full(shape, -math.inf, device=device)
    best_class = torch.zeros(shape, dtype=torch.int64, device=device)
    step = max(1, _ELEMENTS_PER_CHUNK // (shape[0] * shape[1]))
    for start in range(0, num_fg, step):
        value, index = scores(start, min(start + step, num_fg)).max(dim=0)
        better = value > best  # strictly: an earlier class keeps a tie
        best = torch.where(better, value, best)
        best_class = torch.where(better, index + start, best_class)
    return best, best_class


@dataclass
class LabelingRule:
    """The rule of the module docstring, with its vocabulary and thresholds; what scorers call.

    Scorers give `group_window` (segment tokens and their pixel owners) or `dense_window` (per-patch
    scores [C_fg, h, w]) per window; `decide` turns an image's windows into labels.
    """

    text: torch.Tensor  # [C_fg, D] class text embeddings
    logit_scale: float | None  # None: cosine scores (softmax rule only)
    bg_threshold: float | None
    keep_best_group: bool = False  # softmax rule; groupvit always keeps the best group
    name: str = "groupvit"
    top_k: int = 5
    background_names: tuple[str, ...] = ()  # dense scorers: names scored as the background class
    background_text: torch.Tensor | None = None  # [len(background_names), D]
    background: bool = True  # False: no background class; labels are 0..C_fg-1

    def __post_init__(self) -> None:
        if not self.background and (self.bg_threshold is not None or self.background_text is not None):
            raise ValueError("a vocabulary without background has no background threshold or background names")
        if self.name not in RULES:
            raise ValueError(f"rule '{self.name}' is not one of {', '.join(RULES)}")
        if self.top_k < 1:
            raise ValueError(f"top-k must be positive, got {self.top_k}")
        if self.name == "groupvit" and self.logit_scale is None:
            raise ValueError("the groupvit rule needs the CLIP's logit_scale")

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """A: [..., D] -> [..., C_fg] (dense scorers' per-patch scores under both rules)."""
        return class_scores(embeddings, self.text.to(embeddings.device), self.logit_scale)

    def dense_scores(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[..., D] -> (foreground A [..., C_fg], background probability [...] or None without background text):
        with background text the softmax runs over the background names and the classes together."""
        if self.background_text is None:
            return self.scores(embeddings), None
        names = len(self.background_text)
        text = torch.cat([self.background_text, self.text]).to(embeddings.device)  # [names + C_fg, D]
        scores = class_scores(embeddings, text, self.logit_scale)  # [..., names + C_fg]
        return scores[..., names:], scores[..., :names].amax(dim=-1)

    def group_scores(self, groups: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Segment tokens [N, G, D] and image embeddings [N, D] -> [N, G, C_fg]: P (groupvit) or A (softmax)."""
        if self.name == "softmax":
            return self.scores(groups)
        return image_prior_scores(groups, image, self.text.to(groups.device), self.logit_scale, self.top_k)

    def threshold(self, scores: torch.Tensor) -> float:
        """The background value of a window scoring `scores` [N, C_fg]."""
        return window_threshold(scores, self.bg_threshold, self.keep_best_group or self.name == "groupvit")

    def group_window(self, box: tuple, owner: torch.Tensor, group_scores: torch.Tensor) -> GroupWindowScores:
        """owner [h, w] group per footprint pixel, group_scores [G, C_fg] from `group_scores`."""
        return GroupWindowScores(box, self.threshold(group_scores), owner, group_scores)

    def dense_window(
        self, box: tuple, patch_scores: torch.Tensor, patch_background: torch.Tensor | None = None
    ) -> DenseWindowScores:
        """patch_scores [C_fg, h_tokens, w_tokens] and, with background names, the background class's
        patch_background [h_tokens, w_tokens] (both from `dense_scores`), resized to the box."""
        threshold = self.threshold(patch_scores.flatten(1).T)
        if patch_background is not None:
            threshold = background_values(patch_background, box, threshold)  # [h, w]
        return DenseWindowScores(box, threshold, patch_scores)

    def decide(self, windows: list[WindowScores], height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels [H, W] int64 and best averaged foreground scores [H, W] of an image's windows."""
        if self.name == "softmax":
            labels, scores = combine_windows(windows, height, width, len(self.text))
        else:
            labels, scores = fuse_window_logits(windows, height, width, len(self.text), self.bg_threshold is not None)
        return (labels if self.background else labels - 1), scores

    def to_dict(self) -> dict:
        groupvit = self.name == "groupvit"
        cosine = "cosine" if self.logit_scale is None else "softmax(cosine * min(exp(logit_scale), 100))"
        return {
            "rule": self.name,
            "score": "top-k image prior softmax * softmax (GroupViT)" if groupvit else cosine,
            "top_k": min(self.top_k, len(self.text)) if groupvit else None,
            "logit_scale": self.logit_scale,
            "temperature": None if self.logit_scale is None else _scale(self.logit_scale),
            "bg_threshold": self.bg_threshold,
            "keep_best_group": self.keep_best_group or groupvit,
            "background_names": list(self.background_names),
            "background_class": self.background,
            "window_fusion": "mean of [background 0/1, class scores], argmax (mmseg)"
            if groupvit
            else "mean of class scores and background values",
        }
