"""Configuration of the ZeroSeg student (`ModelConfig`) and of its training losses (`LossConfig`).

Both are frozen dataclasses of plain values, so they round-trip through `dataclasses.asdict` and
`from_dict` into a checkpoint that loads with `torch.load(weights_only=True)`.
"""

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    """Lists (as JSON/YAML give them back) turned into the tuples the dataclasses hold."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}


@dataclass(frozen=True)
class ModelConfig:
    """Every size of the student. Defaults are the paper's (ViT-B/16 encoder, 8x512 decoder,
    5-layer segmentation head with 32 then 8 group tokens, CLIP ViT-L/14 teacher dim 768).

    seg_depths: transformer layers of the segmentation head per stage. Stage k < len(num_group_tokens)
        runs its layers over [tokens, group tokens] and ends in a grouping block; the last stage runs
        over the final segment tokens only. (2, 2, 1) = grouping after layers 2 and 4 of 5.
    num_group_tokens: group tokens (= output segments) of each grouping stage.
    proj_hidden_dim: hidden width of the MLPs that project segment tokens to g and the pooled
        segment tokens to z (GroupViT's projector width).
    teacher_dim: output dim of g and z, the teacher's embedding dim.
    gumbel_tau: temperature of the Gumbel-softmax in the training-time hard assignment.
    mask_ratio: fraction of patches removed from the encoder's input in training (MAE masking).
    norm_pix_loss: reconstruct per-patch normalised pixels (MAE's norm_pix_loss).
    """

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    seg_embed_dim: int = 768
    seg_num_heads: int = 12
    seg_depths: tuple[int, ...] = (2, 2, 1)
    num_group_tokens: tuple[int, ...] = (32, 8)
    proj_hidden_dim: int = 4096
    teacher_dim: int = 768
    gumbel_tau: float = 1.0
    mask_ratio: float = 0.6
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        for width, heads, what in (
            (self.embed_dim, self.num_heads, "embed_dim"),
            (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim"),
            (self.seg_embed_dim, self.seg_num_heads, "seg_embed_dim"),
        ):
            if width % heads:
                raise ValueError(f"{what} {width} is not divisible by its {heads} heads")
        for width, what in ((self.embed_dim, "embed_dim"), (self.decoder_embed_dim, "decoder_embed_dim")):
            if width % 4:
                raise ValueError(f"{what} {width} must be a multiple of 4 for the 2-D sin-cos embedding")
        if len(self.seg_depths) != len(self.num_group_tokens) + 1:
            raise ValueError(
                f"seg_depths {self.seg_depths} needs one entry per grouping stage "
                f"{self.num_group_tokens} plus one for the final layers"
            )
        if not self.num_group_tokens or min(self.num_group_tokens) < 1:
            raise ValueError(
                f"num_group_tokens {self.num_group_tokens} needs at least one stage of >= 1 token"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio {self.mask_ratio} is not in [0, 1)")
        if int(self.grid_size**2 * (1 - self.mask_ratio)) < 1:
            raise ValueError(f"mask_ratio {self.mask_ratio} keeps none of the {self.grid_size**2} patches")

    @property
    def masks_patches(self) -> bool:
        """Training hides at least one patch (so the reconstruction decoder runs)."""
        return int(self.grid_size**2 * (1 - self.mask_ratio)) < self.grid_size**2

    @property
    def grid_size(self) -> int:
        """Patches per side at the training resolution."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        return cls(**_tuples(values))


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

    def __post_init__(self) -> None:
        for field in fields(self):
            if field.name.startswith("w_") and getattr(self, field.name) < 0:
                raise ValueError(f"loss weight {field.name} is negative: {getattr(self, field.name)}")
        for name, grids in (("grids", self.grids), ("distill_grids", self.distill_grids)):
            if grids is not None and (not grids or min(grids) < 1):
                raise ValueError(f"{name} {grids} must be a non-empty tuple of grid sizes >= 1")
        if self.l1_reduction not in ("sum", "mean"):
            raise ValueError(f"l1_reduction {self.l1_reduction!r} is not 'sum' or 'mean'")

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
        return cls(**_tuples(values))


_PRESETS = {
    "base": ModelConfig(),
    "tiny": ModelConfig(
        image_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        seg_embed_dim=32,
        seg_num_heads=2,
        seg_depths=(1, 1, 1),
        num_group_tokens=(8, 4),
        proj_hidden_dim=64,
        teacher_dim=32,
    ),
}

PRESET_NAMES = tuple(_PRESETS)


def model_preset(name: str) -> ModelConfig:
    """The named model configuration: "base" (the paper's sizes) or "tiny" (tests, CPU demos)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return _PRESETS[name]
