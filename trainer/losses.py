"""ZeroSeg's three training losses: masked-patch reconstruction, multi-scale distillation into z and
segment matching of g against the local views.

L1 distances follow the paper's |a - b|: the L1 norm, a sum over the feature dim ("sum"), or that norm
divided by the feature dim ("mean", `LossConfig`'s default; see `LossConfig.l1_reduction` for why). The
official implementation was not available to check against.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F

from zeroseg.errors import require
from zeroseg.trainer.model import ZeroSegOutput, patchify
from zeroseg.trainer.model_config import ModelConfig, tuples_of_lists

LOSS_TERMS = ("recon", "distill", "match")  # the weighted terms; total_loss adds "total", their sum


@dataclass(frozen=True)
class LossConfig:
    """Weights and view selection of the three training losses.

    The feature store holds the teacher's views for grids (1, 2, 3, 4): 1 + 4 + 9 + 16 = 30 views,
    grid by grid, cells row-major, view 0 the whole image.

    grids: grids of the stored layout used in training (Table 3 ablations: (1,), (1, 2), (1, 3), ...).
        Distillation uses every view of these grids, segment matching every view except the 1x1.
    distill_grids: overrides the grids used by the distillation loss (Table 4's "Base" distils the
        1x1 view only: distill_grids=(1,)); None = `grids`.
    normalize_targets: L2-normalise the teacher features v before the L1 distances (the store holds
        raw projected embeddings). The student's g and z are left as they are: they regress the
        unit-norm targets, and evaluation compares them to text embeddings by cosine similarity, so
        their norm never reaches a prediction.
    norm_pix_loss: reconstruct per-patch normalised pixels (MAE's norm_pix_loss).
    l1_reduction: how |a - b|_1 reduces the feature dim. "mean" (the default) divides the L1 norm by
        the feature dim D: the paper's |.|_1 with a constant 1/D folded into w_distill and w_match.
        With "sum" (the L1 norm as the paper writes it) and D = 768, the distillation and matching
        terms start about 3000x larger than the per-pixel reconstruction MSE, which then has no say
        in the gradient; "sum" stays selectable for runs that set the weights themselves.
    """

    w_recon: float = 1.0
    w_distill: float = 1.0
    w_match: float = 1.0
    grids: tuple[int, ...] = (1, 2, 3, 4)
    distill_grids: tuple[int, ...] | None = None
    normalize_targets: bool = True
    l1_reduction: Literal["sum", "mean"] = "mean"
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        for field in fields(self):
            if field.name.startswith("w_"):
                weight = getattr(self, field.name)
                require(weight >= 0, f"loss.{field.name} must be >= 0, got {weight}")
        for name, grids in (("grids", self.grids), ("distill_grids", self.distill_grids)):
            require(grids is None or (grids and min(grids) >= 1),
                    f"loss.{name} {grids} must be a non-empty list of grid sizes >= 1")
        require(self.l1_reduction in ("sum", "mean"), f"loss.l1_reduction {self.l1_reduction!r} is not 'sum' or 'mean'")

    @property
    def distillation_grids(self) -> tuple[int, ...]:
        return self.distill_grids if self.distill_grids is not None else self.grids

    @property
    def matching_grids(self) -> tuple[int, ...]:
        """The local grids: every configured grid but the 1x1 whole-image view."""
        return tuple(grid for grid in self.grids if grid != 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LossConfig":
        return cls(**tuples_of_lists(values))


def l1_distances(a: torch.Tensor, b: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Pairwise L1 distances (B, M, D) x (B, N, D) -> (B, M, N); "mean" divides by D."""
    distances = torch.cdist(a.float(), b.float(), p=1)
    return distances / a.shape[-1] if reduction == "mean" else distances


def reconstruction_loss(
    pred: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool
) -> torch.Tensor:
    """MSE per patch, averaged over the masked patches only.

    pred, target_patches: (B, L, P); mask: (B, L), 1 = masked. norm_pix: targets normalised per
    patch, (t - mean) / sqrt(var + 1e-6), with the unbiased variance (torch's default, as MAE).
    """
    target = target_patches.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


def distillation_loss(z: torch.Tensor, v: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """sum_j |z - v_j|_1 over the views, averaged over the batch. z: (B, D), v: (B, V, D)."""
    distances = l1_distances(z[:, None], v, reduction)  # (B, 1, V)
    return distances.sum(dim=(1, 2)).mean()


def segment_matching_loss(g: torch.Tensor, v_local: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """sum_i min_j |g_i - v_j|_1: every segment token to its nearest local view, averaged over the batch.
    g: (B, G, D), v_local: (B, V_local, D)."""
    distances = l1_distances(g, v_local, reduction)  # (B, G, V_local)
    return distances.min(dim=2).values.sum(dim=1).mean()


def view_indices(layout: Sequence[tuple[int, int, int]], grids: Sequence[int]) -> list[int]:
    """Positions in the stored view layout of every view of the given grids."""
    stored = {grid for grid, _, _ in layout}
    missing = [grid for grid in grids if grid not in stored]
    if missing:
        raise ValueError(f"grids {missing} are not in the stored views (grids {sorted(stored)})")
    return [index for index, (grid, _, _) in enumerate(layout) if grid in grids]


def total_loss(
    output: ZeroSegOutput,
    images: torch.Tensor,
    teacher_features: torch.Tensor,
    layout: Sequence[tuple[int, int, int]],
    loss_cfg: LossConfig,
    model_cfg: ModelConfig,
) -> dict[str, torch.Tensor]:
    """The weighted sum of the three losses for one batch.

    images: (B, C, H, W), the model's input. teacher_features: (B, V, D) raw teacher embeddings of the
    V stored views; layout: (grid, row, col) of each stored view (`pipeline.store_meta.view_layout`).
    Returns {"recon", "distill", "match", "total"}; a term with nothing to compute (no masked patch,
    no local grid) is 0.
    """
    if teacher_features.shape[1] != len(layout):
        raise ValueError(f"teacher features hold {teacher_features.shape[1]} views, the layout {len(layout)}")
    views = teacher_features.float()
    if loss_cfg.normalize_targets:
        views = F.normalize(views, dim=-1)
    zero = output.z.new_zeros(())

    if output.pred is None:
        recon = zero
    else:
        target = patchify(images, model_cfg.patch_size)
        recon = reconstruction_loss(output.pred, target, output.mask, loss_cfg.norm_pix_loss)

    distill_views = views[:, view_indices(layout, loss_cfg.distillation_grids)]
    distill = distillation_loss(output.z, distill_views, loss_cfg.l1_reduction)

    if loss_cfg.matching_grids:
        local_views = views[:, view_indices(layout, loss_cfg.matching_grids)]
        match = segment_matching_loss(output.g, local_views, loss_cfg.l1_reduction)
    else:
        match = zero

    total = loss_cfg.w_recon * recon + loss_cfg.w_distill * distill + loss_cfg.w_match * match
    return {**dict(zip(LOSS_TERMS, (recon, distill, match), strict=True)), "total": total}
