"""The sizes of the ZeroSeg student (`ModelConfig`) and its named presets; the losses' settings are
`trainer.losses.LossConfig`, the run's `trainer.config.TrainConfig`.

Every field is checked when the config is made (UserError naming it as the train config's `model.key`). A
frozen dataclass of plain values, so it round-trips through `dataclasses.asdict` and `from_dict` into
a checkpoint that loads with `torch.load(weights_only=True)`.
"""

import math
from dataclasses import asdict, dataclass
from typing import Any

from zeroseg.errors import require


def tuples_of_lists(values: dict[str, Any]) -> dict[str, Any]:
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

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
                     "decoder_num_heads", "seg_embed_dim", "seg_num_heads", "proj_hidden_dim", "teacher_dim"):
            require(getattr(self, name) >= 1, f"model.{name} must be at least 1, got {getattr(self, name)}")
        require(self.decoder_depth >= 0 and min(self.seg_depths, default=0) >= 0,
                f"model.decoder_depth and model.seg_depths must be >= 0, got {self.decoder_depth}, {self.seg_depths}")
        for name in ("mlp_ratio", "gumbel_tau"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, f"model.{name} must be a positive number, got {value}")
        require(self.image_size % self.patch_size == 0,
                f"model.image_size {self.image_size} is not a multiple of model.patch_size {self.patch_size}")
        for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads"),
                             ("seg_embed_dim", "seg_num_heads")):
            require(getattr(self, width) % getattr(self, heads) == 0,
                    f"model.{width} {getattr(self, width)} is not divisible by model.{heads} {getattr(self, heads)}")
        for width in ("embed_dim", "decoder_embed_dim"):
            require(getattr(self, width) % 4 == 0,
                    f"model.{width} {getattr(self, width)} must be a multiple of 4 for the 2-D sin-cos embedding")
        require(len(self.seg_depths) == len(self.num_group_tokens) + 1,
                f"model.seg_depths {self.seg_depths} needs one entry per grouping stage of model.num_group_tokens "
                f"{self.num_group_tokens} plus one for the final layers")
        require(self.num_group_tokens and min(self.num_group_tokens) >= 1,
                f"model.num_group_tokens {self.num_group_tokens} needs at least one stage of >= 1 token")
        require(0.0 <= self.mask_ratio < 1.0, f"model.mask_ratio {self.mask_ratio} is not in [0, 1)")
        require(int(self.grid_size**2 * (1 - self.mask_ratio)) >= 1,
                f"model.mask_ratio {self.mask_ratio} keeps none of the {self.grid_size**2} patches")

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
        """From to_dict's output (as a checkpoint or an export holds it)."""
        return cls(**tuples_of_lists(values))


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
    require(name in PRESET_NAMES, f"model.preset '{name}' is not one of {', '.join(PRESET_NAMES)}")
    return _PRESETS[name]
