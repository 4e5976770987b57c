"""What a store records about itself: the group attribute "zeroseg" of its zarr.json, as `StoreMeta`.

The attribute holds every field (none may be missing: there is one store format) and "sha256", the SHA-256 of the
canonical JSON of the rest (keys sorted, no spaces), so that an edited or damaged value (`normalized`, a mean)
is refused where the store is opened instead of silently changing what its features mean.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from zeroseg import __version__
from zeroseg.errors import DAMAGED, UserError, recorded_fields
from zeroseg.io import canonical_sha256
from zeroseg.pipeline.images import DECODES
from zeroseg.pipeline.sources import SourceSpec
from zeroseg.pipeline.teacher_identity import TeacherIdentity

FORMAT_VERSION = 2  # stores of any other version are refused (FeatureStore.open)
CHECKSUM_KEY = "sha256"

CROP_RULE = "centre square of side min(W, H), resized to crop_size (see pipeline.crops)"
CELL_RULE = "floor(k * crop_size / grid)"


def view_layout(grids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(grid, row, col) of every view, in stored order."""
    return [(g, r, c) for g in grids for r in range(g) for c in range(g)]


@dataclass(frozen=True)
class Preprocessing:
    """How the teacher's views were made from each image (the geometry of pipeline.crops), as a store records it."""

    crop: str  # the centre crop rule, in words (CROP_RULE)
    crop_size: int  # S: side of the centre crop, px
    decode: str = field(kw_only=True)  # how the image is decoded before the crop (pipeline.images.DECODES)
    # decode "device": the device type whose decoder made the crops (pipeline.device_decode); None otherwise
    decode_device: str | None = field(kw_only=True)
    interpolation: str  # of the crop and the view resizes
    antialias: bool
    cell_boundaries: str  # grid cell edges (CELL_RULE)
    view_size: int  # side of each view the teacher sees, px
    mean: tuple[float, ...]  # per channel, 0..1 units
    std: tuple[float, ...]

    @classmethod
    def of(
        cls,
        crop_size: int,
        view_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        decode: str = "full",
        decode_device: str | None = None,
    ) -> "Preprocessing":
        """pipeline.crops' geometry for crops of crop_size px of images decoded as `decode` (on device type
        decode_device for "device"), and a teacher taking view_size px views so normalised."""
        return cls(
            CROP_RULE, crop_size, "bicubic", True, CELL_RULE, view_size, tuple(mean), tuple(std), decode=decode,
            decode_device=decode_device,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict, where: str) -> "Preprocessing":
        """As a store records it (`where` names it in a UserError)."""
        values = every_field(cls, values, where)
        if not all(isinstance(values[name], list) for name in ("mean", "std")):
            raise UserError(f"{where}: mean and std are not lists ({DAMAGED})")
        if values["decode"] not in DECODES:  # any other value would silently decode as "reduced"
            raise UserError(f"{where}: decode '{values['decode']}' is not one of {', '.join(DECODES)} ({DAMAGED})")
        if (values.get("decode") == "device") != isinstance(values.get("decode_device"), str):
            raise UserError(f"{where}: decode_device must name the device type of decode 'device' only ({DAMAGED})")
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})


@dataclass
class StoreMeta:
    """Everything a reader needs to interpret the features; stored as the group attribute "zeroseg", a JSON
    object of these keys (teacher, preprocessing and each source as their to_dict gives them) and its checksum."""

    teacher: TeacherIdentity
    preprocessing: Preprocessing
    grids: list[int]  # the stored views are those of view_layout(grids)
    embed_dim: int
    shard_size: int
    chunk_size: int
    normalized: bool = False  # raw projected embeddings; the trainer normalises
    sources: dict[str, SourceSpec] = field(default_factory=dict)  # name (the manifest's source) -> where
    stored_crops: bool = False  # the store keeps the (S, S, 3) uint8 crops in array "crops"; fixed at creation
    format_version: int = FORMAT_VERSION
    package_version: str = __version__

    @property
    def views(self) -> list[tuple[int, int, int]]:
        """(grid, row, col) of each stored view, in order."""
        return view_layout(self.grids)

    @property
    def num_views(self) -> int:
        return len(self.views)

    def to_attribute(self) -> dict:
        """The group attribute "zeroseg" (plain JSON values), with its checksum."""
        values = {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "teacher": self.teacher.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "grids": list(self.grids),
            "sources": {name: spec.to_dict() for name, spec in self.sources.items()},
        }
        return {**values, CHECKSUM_KEY: canonical_sha256(values)}

    @classmethod
    def from_attribute(cls, values: dict, store: str | Path) -> "StoreMeta":
        """From the group attribute of store `store`; UserError naming the store when it fails its checksum or has
        an unknown or missing key."""
        where = f"store '{store}': attribute zeroseg"
        if not isinstance(values, dict):
            raise UserError(f"{where}: a {type(values).__name__}, not a JSON object ({DAMAGED})")
        if CHECKSUM_KEY not in values:
            raise UserError(f"{where}: no key '{CHECKSUM_KEY}' ({DAMAGED})")
        values = dict(values)
        if values.pop(CHECKSUM_KEY) != canonical_sha256(values):
            raise UserError(f"store '{store}': its metadata fails its checksum (the attribute zeroseg of zarr.json was "
                            f"edited or damaged): restore it, or rebuild the store with zs-cache build")  # fmt: skip
        values = every_field(cls, values, where)
        sources = values["sources"]
        if not isinstance(sources, dict):
            raise UserError(f"{where}.sources: a {type(sources).__name__}, not a JSON object ({DAMAGED})")
        return cls(**{
            **values,
            "teacher": TeacherIdentity.from_dict(values["teacher"], f"{where}.teacher"),
            "preprocessing": Preprocessing.from_dict(values["preprocessing"], f"{where}.preprocessing"),
            "sources": {name: SourceSpec.from_dict(spec, f"{where}.sources.{name}") for name, spec in sources.items()},
        })  # fmt: skip


def every_field(cls: type, values, where: str) -> dict:
    """recorded_fields, with every field of `cls` required (a store records them all)."""
    values = recorded_fields(cls, values, where)
    missing = [f.name for f in fields(cls) if f.name not in values]
    if missing:
        raise UserError(f"{where}: no key '{missing[0]}' ({DAMAGED})")
    return values
