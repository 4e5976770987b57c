"""The feature store: a Zarr array of grid-view features plus a Parquet manifest, shard by shard.

Layout of a store directory (readable with plain zarr and pyarrow):
  zarr.json              Zarr group; attribute "zeroseg" holds the metadata (`StoreMeta.to_attribute`)
  features/              Zarr array (N, V, D) float16, dimensions (image, view, dim), chunks of `chunk_size`
                         whole images, zstd + crc32c
  crops/                 only in stores made with --store-crops: Zarr array (N, S, S, 3) uint8, dimensions
                         (image, y, x, channel), the centre crops the teacher saw, chunked and compressed
                         like features
  manifest/shard-NNNNNN.parquet  one part per committed shard (Parquet page checksums; the shard's chunk
                         files and their crc32c in the key-value metadata, see pipeline.integrity); their
                         union is the manifest. Any other non-dot file there is refused: a stray copy of a
                         part would duplicate its rows.
  manifest/shards-AAAAAA-BBBBBB.parquet  a compacted part (zs-cache compact, pipeline.compact): the rows of
                         several shards, its lowest A and highest B, each shard's commit record in its metadata
  .lock                  held by the one builder allowed at a time

Shards. Shard k owns rows [k * shard_size, (k + 1) * shard_size): a whole number of chunks that no
other shard touches, so shards can be written by different processes at once. Its features (and
crops) are written first, then its manifest part under a dot-prefixed
temporary name (ignored by Parquet readers) which is renamed last: a shard without a part does not
exist, so a build killed at any instant is resumed by redoing the shards that have no part. Rows
that no manifest row points to (failed images, the tail of a short shard) are never read and hold
zeros; Zarr does not store chunks that were never written, so those gaps cost no disk. Valid rows are
the manifest's `row` where `status == "ok"`.
"""

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr
from filelock import FileLock, Timeout
from zarr.codecs import Crc32cCodec, ZstdCodec

from zeroseg import __version__
from zeroseg.pipeline.atomic import atomic_path
from zeroseg.pipeline.duplicates import name_digests, repeated_names, repeated_rows
from zeroseg.pipeline.errors import UserError
from zeroseg.pipeline.images import DECODES
from zeroseg.pipeline.integrity import (
    chunk_key,
    decode_record,
    decode_shard_records,
    encode_record,
    encode_shard_records,
    shard_record,
)
from zeroseg.pipeline.recorded import DAMAGED, recorded_fields
from zeroseg.pipeline.runtime import first_line
from zeroseg.pipeline.sources import SourceSpec
from zeroseg.pipeline.teacher_identity import TeacherIdentity

FORMAT_VERSION = 1
MANIFEST_DIR = "manifest"
# Zarr dimension names, so that xarray.open_zarr(store) reads both arrays
FEATURE_DIMENSIONS = ("image", "view", "dim")
CROP_DIMENSIONS = ("image", "y", "x", "channel")
LOCK_FILE = ".lock"
FEATURES = "features"
CROPS = "crops"
MANIFEST_READERS = 8  # threads reading manifest parts
READ_ATTEMPTS = 3  # listings of the parts while a compact changes them
PART_ROW_GROUP = 65536  # rows per Parquet row group of a part (a compacted part's groups are read in parallel)
PART_NAME = re.compile(r"shard-(\d{6,})\.parquet")
COMPACTED_NAME = re.compile(r"shards-(\d{6,})-(\d{6,})\.parquet")

MANIFEST_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),  # index into features; null for failed images
        ("key", pa.string()),  # stable image id within its source
        ("source", pa.string()),  # source name (a key of StoreMeta.sources)
        ("sha256", pa.string()),  # hash of the encoded image bytes; null when unreadable
        ("width", pa.int32()),  # original size after EXIF rotation; null for failed images
        ("height", pa.int32()),
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),  # reason, for status == "error"
        ("shard", pa.int32()),
        ("time", pa.timestamp("ms", tz="UTC")),
    ]
)


CROP_RULE = "centre square of side min(W, H), resized to crop_size (see pipeline.crops)"
CELL_RULE = "floor(k * crop_size / grid)"


@dataclass(frozen=True)
class Preprocessing:
    """How the teacher's views were made from each image (the geometry of pipeline.crops), as a store records it."""

    crop: str  # the centre crop rule, in words (CROP_RULE)
    crop_size: int  # S: side of the centre crop, px
    # how the image is decoded before the crop (pipeline.images.DECODES); stores made before the setting: "full"
    decode: str = field(default="full", kw_only=True)
    interpolation: str  # of the crop and the view resizes
    antialias: bool
    cell_boundaries: str  # grid cell edges (CELL_RULE)
    view_size: int  # side of each view the teacher sees, px
    mean: tuple[float, ...]  # per channel, 0..1 units
    std: tuple[float, ...]

    @classmethod
    def of(
        cls, crop_size: int, view_size: int, mean: Sequence[float], std: Sequence[float], decode: str = "full"
    ) -> "Preprocessing":
        """pipeline.crops' geometry for crops of crop_size px of images decoded as `decode`, and a teacher taking
        view_size px views so normalised."""
        return cls(CROP_RULE, crop_size, "bicubic", True, CELL_RULE, view_size, tuple(mean), tuple(std), decode=decode)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict, where: str) -> "Preprocessing":
        """As a store records it (`where` names it in a UserError)."""
        values = recorded_fields(cls, values, where)
        if not all(isinstance(values[name], list) for name in ("mean", "std")):
            raise UserError(f"{where}: mean and std are not lists ({DAMAGED})")
        if values.get("decode", "full") not in DECODES:  # any other value would silently decode as "reduced"
            raise UserError(f"{where}: decode '{values['decode']}' is not one of {', '.join(DECODES)} ({DAMAGED})")
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})


@dataclass
class StoreMeta:
    """Everything a reader needs to interpret the features; stored as the group attribute "zeroseg", a JSON
    object of these keys (teacher, preprocessing and each source as their to_dict gives them)."""

    teacher: TeacherIdentity
    preprocessing: Preprocessing
    grids: list[int]
    views: list[list[int]]  # (grid, row, col) per stored view, in order
    embed_dim: int
    shard_size: int
    chunk_size: int
    normalized: bool = False  # raw projected embeddings; the trainer normalises
    sources: dict[str, SourceSpec] = field(default_factory=dict)  # name (the manifest's source) -> where
    stored_crops: bool = False  # the store keeps the (S, S, 3) uint8 crops in array "crops"; fixed at creation
    commit_records: bool = False  # every part carries a commit record (stores made since pipeline.integrity)
    format_version: int = FORMAT_VERSION
    package_version: str = __version__

    @property
    def num_views(self) -> int:
        return len(self.views)

    def to_attribute(self) -> dict:
        """The group attribute "zeroseg" (plain JSON values)."""
        return {
            **{f.name: getattr(self, f.name) for f in fields(self)},
            "teacher": self.teacher.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "grids": list(self.grids),
            "views": [list(view) for view in self.views],
            "sources": {name: spec.to_dict() for name, spec in self.sources.items()},
        }

    @classmethod
    def from_attribute(cls, values: dict, store: str | Path) -> "StoreMeta":
        """From the group attribute of store `store` (stores made before stored crops or commit records lack
        those keys); UserError naming the store for an unknown or missing key."""
        where = f"store '{store}': attribute zeroseg"
        values = recorded_fields(cls, values, where)
        sources = values.get("sources", {})
        if not isinstance(sources, dict):
            raise UserError(f"{where}.sources: a {type(sources).__name__}, not a JSON object ({DAMAGED})")
        return cls(**{
            **values,
            "teacher": TeacherIdentity.from_dict(values["teacher"], f"{where}.teacher"),
            "preprocessing": Preprocessing.from_dict(values["preprocessing"], f"{where}.preprocessing"),
            "sources": {name: SourceSpec.from_dict(spec, f"{where}.sources.{name}") for name, spec in sources.items()},
        })  # fmt: skip


@dataclass(frozen=True)
class ImageRecord:
    """One image of the manifest, what the build found and what readers look up: a manifest row without its
    status (ok when error is None), shard and time. Rows of the Arrow manifest: `manifest_rows`, `image_records`."""

    source: str  # the source's name in StoreMeta.sources
    key: str  # stable image id within its source
    row: int | None = None  # index into features; None for a failed image
    sha256: str | None = None  # hash of the encoded image bytes; None when unreadable (or not checked)
    width: int | None = None  # original size after EXIF rotation; None for failed images
    height: int | None = None
    error: str | None = None  # why the image failed

    @property
    def ok(self) -> bool:
        return self.error is None


RECORD_FIELDS = [f.name for f in fields(ImageRecord)]


class FeatureStore:
    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self.meta = StoreMeta.from_attribute(group.attrs["zeroseg"], path)

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        """A store is there, or something else is (which `open` refuses); False for nothing, or for a
        creation that was killed before its metadata was written (only our own, empty parts: rebuilt)."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            return False
        try:
            metadata = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        except (ValueError, AttributeError):
            raise UserError(f"'{path / 'zarr.json'}' is damaged (not Zarr JSON metadata)") from None
        return "zeroseg" in metadata or not cls._leftovers_only(path)

    @staticmethod
    def _leftovers_only(path: Path) -> bool:
        """The folder holds nothing but parts of an unfinished creation (and the builder lock)."""
        names = {entry.name for entry in path.iterdir()} - {LOCK_FILE}
        return names <= {"zarr.json", FEATURES, CROPS, MANIFEST_DIR} and not any((path / MANIFEST_DIR).glob("*"))

    @classmethod
    def check_creatable(cls, path: str | Path) -> None:
        """UserError unless `path` is missing, empty, or an unfinished creation: a new store never
        overwrites other files."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"store '{path}' is a file, not a folder: give --store a new or empty folder")
        if path.is_dir() and not cls._leftovers_only(path):
            others = sorted({entry.name for entry in path.iterdir()} - {LOCK_FILE})
            raise UserError(
                f"'{path}' is not a feature store and is not empty ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}): give --store a new or empty folder"
            )

    @classmethod
    def open(cls, path: str | Path, writable: bool = False) -> "FeatureStore":
        if not cls.exists(path):
            raise UserError(f"'{path}' is not a feature store (no zarr.json); build one with zs-cache build")
        try:
            group = zarr.open_group(str(path), mode="r+" if writable else "r", use_consolidated=False)
            arrays = [group[name] for name in (FEATURES, CROPS) if name in group]  # parses their zarr.json
        except (ValueError, TypeError, KeyError, OSError) as exc:
            raise UserError(f"store '{path}' has damaged Zarr metadata ({first_line(exc)})") from None
        if "zeroseg" not in group.attrs or not arrays:
            raise UserError(f"'{path}' is a Zarr group but not a zeroseg feature store")
        recorded = group.attrs["zeroseg"]
        version = recorded.get("format_version") if isinstance(recorded, dict) else None
        if version != FORMAT_VERSION:
            raise UserError(f"'{path}' has store format {version}; this zeroseg reads format {FORMAT_VERSION}")
        return cls(path, group)

    @classmethod
    def create(cls, path: str | Path, meta: StoreMeta) -> "FeatureStore":
        if meta.shard_size % meta.chunk_size:
            raise UserError(f"--shard-size {meta.shard_size} must be a multiple of the chunk size {meta.chunk_size}")
        cls.check_creatable(path)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for leftover in (path / name for name in ("zarr.json", FEATURES, CROPS, MANIFEST_DIR)):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            elif leftover.exists():
                leftover.unlink()
        group = zarr.open_group(str(path), mode="a", use_consolidated=False)  # never "w": it empties the folder
        group.create_array(
            FEATURES,
            shape=(0, meta.num_views, meta.embed_dim),
            chunks=(meta.chunk_size, meta.num_views, meta.embed_dim),
            dtype="float16",
            compressors=[ZstdCodec(level=3), Crc32cCodec()],
            fill_value=0,
            dimension_names=FEATURE_DIMENSIONS,
        )
        if meta.stored_crops:
            size = meta.preprocessing.crop_size
            group.create_array(
                CROPS,
                shape=(0, size, size, 3),
                chunks=(meta.chunk_size, size, size, 3),
                dtype="uint8",
                compressors=[ZstdCodec(level=3), Crc32cCodec()],
                fill_value=0,
                dimension_names=CROP_DIMENSIONS,
            )
        group.attrs["zeroseg"] = meta.to_attribute()
        (Path(path) / MANIFEST_DIR).mkdir(exist_ok=True)
        return cls(path, group)

    @property
    def features(self) -> zarr.Array:
        return self.group[FEATURES]

    @property
    def crops(self) -> zarr.Array:
        return self.group[CROPS]

    def save_meta(self) -> None:
        self.group.attrs["zeroseg"] = self.meta.to_attribute()

    # --- manifest -------------------------------------------------------------------------------

    def part_path(self, shard: int) -> Path:
        return self.path / MANIFEST_DIR / f"shard-{shard:06d}.parquet"

    def compacted_path(self, shards) -> Path:
        return self.path / MANIFEST_DIR / f"shards-{min(shards):06d}-{max(shards):06d}.parquet"

    def part_files(self) -> dict[Path, tuple[int, ...]]:
        """Each committed manifest part -> the shards it holds, in shard order (see `committed_parts`)."""
        return committed_parts(self.listed_parts())[0]

    def leftover_parts(self) -> list[Path]:
        """Parts left by an interrupted compaction: their shards are all in a larger part (zs-cache compact
        removes them)."""
        return committed_parts(self.listed_parts())[1]

    def listed_parts(self, unreadable: list[Path] | None = None) -> dict[Path, tuple[int, ...]]:
        """Every part file in manifest/ -> the shards it names (single parts) or records (compacted parts: their
        footers are read). UserError for any other (non-dot) file there, and for a compacted part whose footer
        does not read, unless `unreadable` is given: such parts are then left out and added to it."""
        singles, compacted = {}, []
        for path in sorted((self.path / MANIFEST_DIR).iterdir()):
            if path.name.startswith("."):  # partial writes (pipeline.atomic)
                continue
            match = PART_NAME.fullmatch(path.name)
            if match is not None and path.is_file():
                singles[path] = (int(match.group(1)),)
            elif COMPACTED_NAME.fullmatch(path.name) and path.is_file():
                compacted.append(path)
            else:
                raise UserError(
                    f"'{path}' is not a manifest part (parts are named shard-NNNNNN.parquet): move it out of the "
                    f"store; a copy of a part would duplicate its images"
                )

        def shards_of(path: Path) -> tuple[int, ...] | None:
            try:
                return tuple(self.part_records(path))
            except UserError:
                if unreadable is None:
                    raise
                unreadable.append(path)
                return None

        with ThreadPoolExecutor(MANIFEST_READERS) as pool:
            held = dict(zip(compacted, pool.map(shards_of, compacted)))
        return {**singles, **{path: shards for path, shards in held.items() if shards is not None}}

    def unreadable_shards(self, path: Path, held: set[int]) -> list[int]:
        """The shards a compacted part whose footer does not read may hold: those of its name's range that no
        other part `held`."""
        first, last = map(int, COMPACTED_NAME.fullmatch(path.name).groups())
        return [shard for shard in range(first, last + 1) if shard not in held]

    def parts(self) -> dict[int, Path]:
        """Committed shard -> the manifest part holding it."""
        return {shard: path for path, shards in self.part_files().items() for shard in shards}

    def committed_shards(self) -> set[int]:
        return set(self.parts())

    def read_part(self, path: Path, columns: list[str] | None = None) -> pa.Table:
        """One manifest part, its page checksums verified and its columns exactly the manifest's (a damaged
        footer could rename one, which a schema-evolving read would fill with nulls); UserError naming it."""
        try:
            part = pq.ParquetFile(path, page_checksum_verification=True)
            found = [(f.name, f.type) for f in part.schema_arrow]
            if found != [(f.name, f.type) for f in MANIFEST_SCHEMA]:
                raise ValueError(f"its columns are {', '.join(f'{name}: {kind}' for name, kind in found)}")
            return part.read(columns=columns)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise damaged_part(path, exc) from None

    def chunk_record(self, path: Path) -> dict[str, dict[str, str]] | None:
        """The commit record of single part `path` (pipeline.integrity), None for a part written before records
        existed."""
        record = decode_record(self._footer(path), path)
        if record is None and self.meta.commit_records:
            raise UserError(f"manifest part '{path}' is damaged (it lacks the chunk record of this store's parts)")
        return record

    def part_records(self, path: Path) -> dict[int, dict[str, dict[str, str]] | None]:
        """Shard -> commit record of each shard in part `path` (one for a single part, several for a compacted one)."""
        match = PART_NAME.fullmatch(path.name)
        if match is not None:
            return {int(match.group(1)): self.chunk_record(path)}
        return decode_shard_records(self._footer(path), path)

    def records(self) -> dict[int, dict[str, dict[str, str]] | None]:
        """Committed shard -> its commit record, the parts' footers read by a thread pool."""

        def read() -> dict[int, dict[str, dict[str, str]] | None]:
            with ThreadPoolExecutor(MANIFEST_READERS) as pool:
                held = list(pool.map(self.part_records, self.part_files()))
            return {shard: record for records in held for shard, record in records.items()}

        return self._while_stable(read)

    def _while_stable(self, read: Callable[[], object]):
        """read() of the parts, listed and read again when they changed meanwhile (readers take no lock: a
        compact may replace parts while they are read); its UserError when they did not."""
        for attempt in range(READ_ATTEMPTS):
            names = self._part_names()
            try:
                return read()
            except UserError:
                if attempt == READ_ATTEMPTS - 1 or self._part_names() == names:
                    raise

    def _part_names(self) -> list[str]:
        return sorted(name for name in os.listdir(self.path / MANIFEST_DIR) if not name.startswith("."))

    def part_size(self, path: Path) -> int:
        """Rows of manifest part `path`, from its footer."""
        return self._metadata(path).num_rows

    def _footer(self, path: Path) -> dict[bytes, bytes] | None:
        return self._metadata(path).metadata

    def _metadata(self, path: Path) -> pq.FileMetaData:
        try:
            return pq.read_metadata(path)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise damaged_part(path, exc) from None

    def manifest(
        self,
        columns: list[str] | None = None,
        each: Callable[[pa.Table, Path], pa.Table] | None = None,
        unique: bool = True,
    ) -> pa.Table:
        """The union of all committed parts in shard order (an empty table with the schema when there are
        none). Parts are read by a thread pool (Parquet decoding releases the GIL; on a network filesystem
        the reads overlap), each checked by `read_part`, with only the wanted columns and passed through
        `each(table, part path)` (a filter or a compact encoding, so the whole manifest never exists in its
        plain form). unique: refuse (UserError) an image or a row that two manifest rows claim, when the
        columns to tell are read."""
        each = each or (lambda table, part: table)

        def read() -> pa.Table:
            parts = self.part_files()
            if not parts:
                empty = MANIFEST_SCHEMA.empty_table().select(columns or MANIFEST_SCHEMA.names)
                return each(empty, self.path / MANIFEST_DIR)
            with ThreadPoolExecutor(MANIFEST_READERS) as pool:
                return pa.concat_tables(list(pool.map(lambda part: each(self.read_part(part, columns), part), parts)))

        table = self._while_stable(read)
        if unique:
            refuse_duplicates(self.path, table)
        return table

    def required_chunks(self, ok_rows: np.ndarray) -> dict[str, set[int]]:
        """Array -> indices of the chunks whose files must exist (Zarr would read a lost one as zeros): those in
        the commit records; for shards committed before records existed, the features chunks of `ok_rows`."""
        arrays = self.arrays()
        required: dict[str, set[int]] = {name: set() for name in arrays}
        chunk, per_shard = self.meta.chunk_size, self.meta.shard_size // self.meta.chunk_size
        legacy = set()
        for shard, record in self.records().items():
            if record is None:
                legacy.add(shard)
                continue
            first = shard * per_shard
            for name, array in arrays.items():
                files = record.get(name, {})
                required[name].update(i for i in range(first, first + per_shard) if chunk_key(array, i) in files)
        rows = np.asarray(ok_rows)
        legacy_rows = rows[np.isin(rows // self.meta.shard_size, list(legacy))]
        required[FEATURES].update(int(i) for i in np.unique(legacy_rows // chunk))
        return required

    # --- writing shards -------------------------------------------------------------------------

    def shard_rows(self, shard: int) -> int:
        return shard * self.meta.shard_size

    def reserve(self, shard: int, count: int) -> None:
        """Grow the arrays so that shard `shard` can hold `count` images (before any process writes it)."""
        needed = self.shard_rows(shard) + count
        for array in (self.features, self.crops) if self.meta.stored_crops else (self.features,):
            if array.shape[0] < needed:
                array.resize((needed, *array.shape[1:]))

    def arrays(self) -> dict[str, zarr.Array]:
        """The chunked arrays a shard writes: features, and crops in stores that keep them."""
        return {name: self.group[name] for name in ((FEATURES, CROPS) if self.meta.stored_crops else (FEATURES,))}

    def write_shard(self, shard: int, features: np.ndarray, crops: np.ndarray | None) -> dict:
        """Write a shard's features (n, V, D) and, in stores that keep them, its crops (n, S, S, 3); returns
        its commit record (the chunk files written and their crc32c, for `commit`)."""
        start = self.shard_rows(shard)
        arrays = [(FEATURES, features)] + ([(CROPS, crops)] if self.meta.stored_crops else [])
        for name, values in arrays:
            self.group[name][start : start + len(values)] = values
            self._sync_chunks(name, start, len(values))
        chunk = self.meta.chunk_size
        return shard_record(self.path, self.arrays(), range(start // chunk, (start + len(features) - 1) // chunk + 1))

    def remove_shard(self, shard: int) -> None:
        """Un-commit a shard, then delete its chunk files. From the first step on the shard does not exist: its
        part is removed, or a compacted part holding it is rewritten without its rows (removed when it held no
        other shard). A compacted part that no longer reads is removed whole, with the chunks of every shard
        it may hold. Leftovers of an interrupted compaction go first: they would hold the shard again."""
        unreadable: list[Path] = []
        parts, leftovers = committed_parts(self.listed_parts(unreadable))
        for leftover in leftovers:
            leftover.unlink()
        held = {held: path for path, shards in parts.items() for held in shards}
        part, shards = self.part_path(shard), [shard]
        holder = held.get(shard, part)
        for broken in unreadable:
            if shard in self.unreadable_shards(broken, set(held)):
                shards = self.unreadable_shards(broken, set(held))
                broken.unlink()
        if holder != part:
            try:
                rows, records = self.read_part(holder), self.part_records(holder)
            except UserError:
                shards = list(parts[holder])
                holder.unlink()
            else:
                del records[shard]
                if records:
                    kept = rows.filter(pc.not_equal(rows["shard"], shard))
                    self.write_part(holder, kept, encode_shard_records(records))
                else:
                    holder.unlink()
        part.unlink(missing_ok=True)
        chunk = self.meta.chunk_size
        for first in (self.shard_rows(s) for s in shards):
            for name, array in self.arrays().items():
                for index in range(first // chunk, (first + self.meta.shard_size) // chunk):
                    (self.path / name / chunk_key(array, index)).unlink(missing_ok=True)

    def _sync_chunks(self, name: str, start: int, count: int) -> None:
        """Flush a row range's chunk files to disk, so a part committed after them survives a power loss."""
        array, chunk = self.group[name], self.meta.chunk_size
        for index in range(start // chunk, (start + count - 1) // chunk + 1):
            path = self.path / name / chunk_key(array, index)
            if path.exists():  # Zarr writes no file for a chunk of fill values (a shard of failed images)
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())

    def commit(self, shard: int, rows: pa.Table, record: dict) -> None:
        """Publish a shard: its manifest part, with page checksums and the commit record `record` (from
        write_shard), appears atomically, after its features."""
        self.write_part(self.part_path(shard), rows, encode_record(record))

    def write_part(self, path: Path, rows: pa.Table, metadata: dict[bytes, bytes]) -> None:
        """Write manifest part `path` atomically: `rows` in the manifest schema with page checksums, `metadata`
        (its commit record or records) as its key-value metadata."""
        table = rows.cast(MANIFEST_SCHEMA).replace_schema_metadata(metadata)
        with atomic_path(path) as partial:
            pq.write_table(table, partial, write_page_checksum=True, row_group_size=PART_ROW_GROUP)


def committed_parts(listed: dict[Path, tuple[int, ...]]) -> tuple[dict[Path, tuple[int, ...]], list[Path]]:
    """(the committed parts -> their shards, in shard order; the leftovers of an interrupted compaction).

    Every committed shard is held by exactly one part. A compaction writes its merged part before it removes
    the parts it merged, so a kill in between leaves parts whose shards all lie in one larger part: those are
    its leftovers (the same rows again) and are skipped. UserError for parts that overlap otherwise."""
    owner: dict[int, Path] = {}
    committed, leftovers = {}, []
    for path, shards in sorted(listed.items(), key=lambda item: (-len(item[1]), item[0].name)):
        owners = {owner.get(shard) for shard in shards}
        if owners == {None}:
            committed[path] = shards
            owner.update(dict.fromkeys(shards, path))
        elif len(owners) == 1:
            leftovers.append(path)
        else:
            shard = next(shard for shard in shards if shard in owner)
            raise UserError(
                f"manifest parts '{path}' and '{owner[shard]}' both hold shard {shard}: one of them is a stray copy; "
                f"move it out of the store"
            )
    return dict(sorted(committed.items(), key=lambda item: item[1][0])), leftovers


def damaged_part(path: Path, exc: Exception) -> UserError:
    return UserError(f"manifest part '{path}' is damaged ({first_line(exc)}): run zs-cache build --repair")


def refuse_duplicates(path: Path, table: pa.Table) -> None:
    """UserError when two manifest rows hold the same image (source, key) or the same features row (found from
    digests: pipeline.duplicates)."""
    names = set(table.column_names)
    if {"source", "key"} <= names:
        repeated = repeated_names(name_digests(table["source"], table["key"]), partial(name_list, table))
        if repeated:
            name, count = next(iter(repeated.items()))
            raise UserError(
                f"store '{path}': image {name} appears {count} times in the manifest ({len(repeated)} duplicated "
                f"images): run zs-cache verify"
            )
    if "row" in names:
        repeated = repeated_rows(table["row"].drop_null().to_numpy())
        if repeated:
            raise UserError(
                f"store '{path}': features row {next(iter(repeated))} is claimed by several manifest rows: "
                f"run zs-cache verify"
            )


def name_list(table: pa.Table, indices: np.ndarray) -> list[str]:
    """'source/key' of rows `indices` of a manifest table."""
    rows = table.select(["source", "key"]).take(pa.array(indices))
    return pc.binary_join_element_wise(rows["source"], rows["key"], "/").to_pylist()


def manifest_rows(shard: int, records: list[ImageRecord]) -> pa.Table:
    """Shard `shard`'s manifest part from the records of its images."""
    now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC"))
    columns = {name: [getattr(record, name) for record in records] for name in RECORD_FIELDS}
    columns["status"] = ["ok" if record.ok else "error" for record in records]
    columns["shard"] = [shard] * len(records)
    columns["time"] = [now] * len(records)
    return pa.table(columns, schema=MANIFEST_SCHEMA)


def image_records(table: pa.Table) -> list[ImageRecord]:
    """The records of manifest rows (any selection of columns holding source and key; the others are None)."""
    names = [name for name in RECORD_FIELDS if name in table.column_names]
    return [ImageRecord(**row) for row in table.select(names).to_pylist()]


@contextmanager
def builder_lock(path: str | Path):
    """Exclusive right to write a store; a second builder is refused at once with a clear message.

    The lock is an OS file lock, released by the kernel when its process dies, so a killed build
    never leaves the store locked. A build that ends before creating the store (its teacher failed
    to load, say) removes the lock file, and the folder when it made it: it leaves nothing behind.
    """
    path = Path(path)
    made_folder = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"store '{path}' is being written by another zs-cache build; wait for it to finish") from None
    try:
        yield
    finally:
        if {entry.name for entry in path.iterdir()} == {LOCK_FILE}:
            (path / LOCK_FILE).unlink()
            if made_folder:
                path.rmdir()
        lock.release()
