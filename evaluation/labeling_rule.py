"""The labeling rule of zero-shot evaluation, whole: embeddings -> per-window channel maps on the resized
image -> fused there -> resized once to the original image -> one label per pixel. Pure tensor functions,
no model; the window geometry is evaluation.windows, the order of the steps mmseg 0.x's
`EncoderDecoder.slide_inference` / `whole_inference` (sum / count of the windows' maps on the resized
image, one bilinear resize to the original size, then the decision).

Label convention everywhere: 0 is background, k >= 1 is foreground class k. Embeddings and texts are
L2-normalised here; s = min(exp(logit_scale), 100).

Rule `groupvit` (default; GroupViT's `GroupViTSegInference.encode_decode`, the protocol of the paper's Table 1),
per window, text t [C_fg, D] one row per class:
  A      = softmax_c(g t^T s)                                   [G, C_fg]  g: segment embeddings
  prior  = the top-k classes (k = min(top_k, C_fg)) of softmax_c(z t^T s), z the image embedding;
  A_top  = softmax_c of g t^T s with the other classes set to -inf [G, C_fg]
  P      = A_top * A                                              [G, C_fg]
  channels [1 + C_fg] per window pixel: its group's (the argmax of the composed soft assignment resized
  bilinearly to the window) background 0/1 (1 where the group's best score < min(bg_threshold, max P))
  and its row of P. The fused, resized channels' argmax is the label; background (channel 0) wins ties.
Rule `softmax` on groups (the rule before GroupViT's; kept to reproduce those numbers): the rows are A and
channel 0 holds the window's background value (bg_threshold, or min(bg_threshold, best score of the window)
with keep_best_group); a pixel is background where its best fused score is strictly below the fused value.

Dense scorers (MaskCLIP, SCLIP, ClearCLIP, NACLIP; always their own `softmax` order, as SCLIP's
`postprocess_result` runs it): the channels are the raw cosines of every query (a class may have several
names, the background class too), resized bilinearly to the window and fused; after the resize (and the
optional refinement, evaluation.refinement) the scores are softmax over all queries of cosine * s, a class
scores the max over its names, classes below `area_threshold` of the foreground area lose their scores
(SCLIP's area_thd), the pixel takes the best class, and background where that score is below bg_threshold.

Without bg_threshold no pixel is background by threshold; ties go to the lower class index.

Vocabularies without a background class (`background=False`: voc20, context59, coco-stuff, cityscapes,
ade20k) have no threshold and no background names: every pixel takes its best class, labelled k - 1 for
foreground class k, so labels are the class indices 0..C_fg-1 of the vocabulary.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zeroseg.evaluation.refinement import area_filter_kept, pamr

RULES = ("groupvit", "softmax")
NEVER = -1.0  # a background value no score is below (scores are probabilities); finite, so resizing keeps it
_ELEMENTS_PER_CHUNK = 1 << 24  # channel elements held at once when fusing windows (64 MiB fp32)


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
    """[..., D] embeddings, [C, D] text -> [..., C] float32 scores, both sides L2-normalised here:
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


@dataclass
class GroupWindow:
    """ZeroSeg: each window pixel takes the row of `table` [G, 1 + C_fg] of the group that owns it."""

    box: tuple[int, int, int, int]  # top, left, height, width on the resized image
    owner: torch.Tensor  # [h, w] int64 group index
    table: torch.Tensor  # [G, 1 + C_fg]: the background channel, then the class scores

    @property
    def device(self) -> torch.device:
        return self.owner.device

    def channels(self, start: int, stop: int) -> torch.Tensor:
        rows = self.table[:, start:stop].T.contiguous()  # [stop - start, G]
        return rows.index_select(1, self.owner.flatten()).view(-1, *self.owner.shape)  # [stop - start, h, w]


@dataclass
class DenseWindow:
    """Dense scorers: per-patch cosines resized bilinearly (align_corners=False) to the window, or to the
    window padded to the patch grid and cut back (`offset`, ClearCLIP's forward_slide)."""

    box: tuple[int, int, int, int]
    patch_logits: torch.Tensor  # [Q, h_tokens, w_tokens]
    size: tuple[int, int]  # the size the patch maps are resized to (the window's, or its padded one)
    offset: tuple[int, int] = (0, 0)  # top, left of the window inside `size`

    @property
    def device(self) -> torch.device:
        return self.patch_logits.device

    def channels(self, start: int, stop: int) -> torch.Tensor:
        resized = F.interpolate(self.patch_logits[None, start:stop], size=self.size, mode="bilinear")[0]
        (top, left), (_, _, rows, cols) = self.offset, self.box
        return resized[:, top : top + rows, left : left + cols]


def fused_channels(
    windows: Sequence[GroupWindow | DenseWindow], canvas_hw: tuple[int, int], out_hw: tuple[int, int]
) -> Callable[[int, int], torch.Tensor]:
    """mmseg's fusion: channels start..stop-1 of the windows summed on the resized image, divided by the
    number of windows covering each pixel, resized bilinearly to out_hw -> [stop - start, H, W]."""
    device = windows[0].device
    count = torch.zeros(canvas_hw, device=device)
    for window in windows:
        top, left, rows, cols = window.box
        count[top : top + rows, left : left + cols] += 1

    def channels(start: int, stop: int) -> torch.Tensor:
        if len(windows) == 1 and windows[0].box == (0, 0, *canvas_hw):  # one window (whole mode) is the mean
            mean = windows[0].channels(start, stop)
        else:
            total = torch.zeros(stop - start, *canvas_hw, device=device)  # [chunk, H', W']
            for window in windows:
                top, left, rows, cols = window.box
                total[:, top : top + rows, left : left + cols] += window.channels(start, stop)
            mean = total / count
        return F.interpolate(mean[None], size=out_hw, mode="bilinear", align_corners=False)[0]

    return channels


def _chunks(count: int, out_hw: tuple[int, int]) -> list[tuple[int, int]]:
    step = max(1, _ELEMENTS_PER_CHUNK // (out_hw[0] * out_hw[1]))
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def best_channel(
    channels: Callable[[int, int], torch.Tensor], start: int, stop: int, out_hw: tuple[int, int], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and argmax (relative to `start`; an earlier channel keeps a tie) over channels start..stop-1,
    a chunk at a time so that memory stays bounded for large vocabularies -> [H, W], [H, W]."""
    best = torch.full(out_hw, -math.inf, device=device)
    best_index = torch.zeros(out_hw, dtype=torch.int64, device=device)
    for first, last in _chunks(stop - start, out_hw):
        value, index = channels(start + first, start + last).max(dim=0)
        better = value > best
        best = torch.where(better, value, best)
        best_index = torch.where(better, index + first, best_index)
    return best, best_index


@dataclass
class LabelingRule:
    """The rule of the module docstring, with its vocabulary and thresholds; what scorers call.

    text [Q, D] has one row per name; query_class gives each row's class (1..C_fg; None: row i is class
    i + 1, one name per class). background_text [B, D], dense scorers only, are the background class's names.
    """

    text: torch.Tensor
    logit_scale: float | None  # None: cosine scores (softmax rule on groups only)
    bg_threshold: float | None
    keep_best_group: bool = False  # softmax rule on groups; groupvit always keeps the best group
    name: str = "groupvit"
    top_k: int = 5
    background_names: tuple[str, ...] = ()
    background_text: torch.Tensor | None = None
    query_class: tuple[int, ...] | None = None
    area_threshold: float | None = None  # dense: SCLIP's area_thd
    pamr_steps: int = 0  # dense: NACLIP's PAMR iterations (0: off)
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
        if self.query_class is None:
            self.query_class = tuple(range(1, len(self.text) + 1))

    @property
    def num_fg(self) -> int:
        return max(self.query_class)

    def queries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All query texts [Q', D] (background names first) and each one's label [Q'] (0 background)."""
        background = self.background_text if self.background_text is not None else self.text[:0]
        labels = (0,) * len(background) + tuple(self.query_class)
        return torch.cat([background, self.text]), torch.tensor(labels)

    def dense_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Patch embeddings [..., D] -> cosines with every query [..., Q']."""
        return class_scores(embeddings, self.queries()[0].to(embeddings.device))

    def group_window(self, box: tuple, owner: torch.Tensor, groups: torch.Tensor, image: torch.Tensor) -> GroupWindow:
        """owner [h, w] group per window pixel; groups [G, D] segment tokens, image [D] image embedding."""
        return GroupWindow(box, owner, self.group_tables(groups[None], image[None])[0])

    def group_tables(self, groups: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """groups [N, G, D] segment tokens and image [N, D] embeddings of N windows -> [N, G, 1 + C_fg]: each
        group's background channel, then its class scores; one pass for a batch of windows, no host sync."""
        text = self.text.to(groups.device)
        if self.name == "softmax":
            scores = class_scores(groups, text, self.logit_scale)  # A [N, G, C_fg]
            threshold = torch.full_like(scores[:, :1, :1], NEVER if self.bg_threshold is None else self.bg_threshold)
            if self.keep_best_group and self.bg_threshold is not None:
                threshold = threshold.minimum(scores.amax(dim=(1, 2), keepdim=True))  # [N, 1, 1]
            background = threshold.expand_as(scores[..., :1])  # [N, G, 1]
        else:
            scores = image_prior_scores(groups, image, text, self.logit_scale, self.top_k)  # P [N, G, C_fg]
            if self.bg_threshold is None:
                background = torch.full_like(scores[..., :1], NEVER)
            else:
                best = scores.amax(dim=-1, keepdim=True)  # [N, G, 1]
                cut = best.amax(dim=1, keepdim=True).clamp(max=self.bg_threshold)  # [N, 1, 1]: min(threshold, best P)
                background = (best < cut).float()  # [N, G, 1] 0/1
        return torch.cat([background, scores], dim=-1)

    def decide(
        self,
        windows: Sequence[GroupWindow | DenseWindow],
        canvas_hw: tuple[int, int],
        out_hw: tuple[int, int],
        guide: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels [H, W] int64 and each pixel's best foreground score [H, W] of an image's windows on the
        resized image canvas_hw, decided at the original size out_hw; guide [3, H, W]: the resized image
        brought back to the original size (PAMR's affinities)."""
        channels = fused_channels(windows, canvas_hw, out_hw)
        device = windows[0].device
        if isinstance(windows[0], DenseWindow):
            labels, scores = self._decide_dense(channels, out_hw, device, guide)
        else:
            background = channels(0, 1)[0]
            scores, index = best_channel(channels, 1, 1 + self.num_fg, out_hw, device)
            is_background = scores <= background if self.name == "groupvit" else scores < background
            labels = torch.where(is_background, 0, index + 1)
        return (labels if self.background else labels - 1), scores

    def _decide_dense(self, fused, out_hw, device, guide) -> tuple[torch.Tensor, torch.Tensor]:
        """SCLIP's postprocess_result (module docstring). The dense methods' vocabularies are small (a
        benchmark's names), so every query's map is held at once [Q', H, W]."""
        labels = self.queries()[1].to(device)
        logits = torch.cat([fused(start, stop) for start, stop in _chunks(len(labels), out_hw)])  # [Q', H, W]
        if self.pamr_steps:
            logits = pamr(guide, logits, self.pamr_steps)
        probabilities = (logits * _scale(self.logit_scale)).softmax(dim=0)
        best, query = probabilities.max(dim=0)  # a class's score is its best name's: argmax over names
        label = labels[query]
        if self.area_threshold is not None:
            kept = area_filter_kept(label, self.num_fg, self.area_threshold)  # [1 + C_fg] bool
            if not kept[label].all():
                best, query = probabilities.masked_fill(~kept[labels][:, None, None], 0.0).max(dim=0)
                label = labels[query]
        if self.bg_threshold is not None:
            label = torch.where(best < self.bg_threshold, 0, label)
        return label, best

    def to_dict(self) -> dict:
        groupvit = self.name == "groupvit"
        cosine = "cosine" if self.logit_scale is None else "softmax(cosine * min(exp(logit_scale), 100))"
        return {
            "rule": self.name,
            "score": "top-k image prior softmax * softmax (GroupViT)" if groupvit else cosine,
            "top_k": min(self.top_k, self.num_fg) if groupvit else None,
            "logit_scale": self.logit_scale,
            "temperature": None if self.logit_scale is None else _scale(self.logit_scale),
            "bg_threshold": self.bg_threshold,
            "keep_best_group": self.keep_best_group or groupvit,
            "background_names": list(self.background_names),
            "queries": len(self.queries()[1]),  # class and background names, synonyms included
            "area_threshold": self.area_threshold,
            "pamr_steps": self.pamr_steps,
            "background_class": self.background,
            "window_fusion": "mean of the windows' channels on the resized image (mmseg), one bilinear resize to"
            " the original size, then the decision",
        }
