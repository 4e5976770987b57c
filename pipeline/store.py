"""The feature store: a Zarr array of grid-view features plus a Parquet manifest, shard by shard.

Layout of a store directory (readable with plain zarr and pyarrow):
  zarr.json              Zarr group; attribute "zeroseg" holds the metadata (see `StoreMeta`)
  features/              Zarr array (N, V, D) float16, dimensions (image, view, dim), chunks of `chunk_size`
                         whole images, zstd
  crops/                 only in stores made with --store-crops: Zarr array (N, S, S, 3) uint8, dimensions
                         (image, y, x, channel), the centre crops the teacher saw, chunked and compressed
                         like features
  manifest/shard-*.parquet  one part per committed shard; their union is the manifest
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
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from filelock import FileLock, Timeout
from zarr.codecs import ZstdCodec

from zeroseg import __version__
from zeroseg.pipeline.atomic import atomic_path
from zeroseg.pipeline.errors import UserError

FORMAT_VERSION = 1
MANIFEST_DIR = "manifest"
# Zarr dimension names, so that xarray.open_zarr(store) reads both arrays
FEATURE_DIMENSIONS = ("image", "view", "dim")
CROP_DIMENSIONS = ("image", "y", "x", "channel")
LOCK_FILE = ".lock"
FEATURES = "features"
CROPS = "crops"
MANIFEST_READERS = 8  # threads reading manifest parts

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


@dataclass
class StoreMeta:
    """Everything a reader needs to interpret the features; stored as the group attribute "zeroseg"."""

    teacher: dict  # pipeline.teacher.TeacherIdentity as a dict
    preprocessing: dict  # crop rule, crop_size, view_size, interpolation, mean, std
    grids: list[int]
    views: list[list[int]]  # (grid, row, col) per stored view, in order
    embed_dim: int
    shard_size: int
    chunk_size: int
    normalized: bool = False  # raw projected embeddings; the trainer normalises
    sources: dict[str, dict] = field(default_factory=dict)  # name -> pipeline.sources.SourceSpec dict
    stored_crops: bool = False  # the store keeps the (S, S, 3) uint8 crops in array "crops"; fixed at creation
    format_version: int = FORMAT_VERSION
    package_version: str = __version__

    @property
    def num_views(self) -> int:
        return len(self.views)


class FeatureStore:
    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self.meta = StoreMeta(**group.attrs["zeroseg"])

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        """A store is there, or something else is (which `open` refuses); False for nothing, or for a
        creation that was killed before its metadata was written (only our own, empty parts: rebuilt)."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            return False
        metadata = json.loads((path / "zarr.json").read_text()).get("attributes", {})
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
        group = zarr.open_group(str(path), mode="r+" if writable else "r", use_consolidated=False)
        if "zeroseg" not in group.attrs:
            raise UserError(f"'{path}' is a Zarr group but not a zeroseg feature store")
        version = group.attrs["zeroseg"].get("format_version")
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
            compressors=ZstdCodec(level=3),
            fill_value=0,
            dimension_names=FEATURE_DIMENSIONS,
        )
        if meta.stored_crops:
            size = meta.preprocessing["crop_size"]
            group.create_array(
                CROPS,
                shape=(0, size, size, 3),
                chunks=(meta.chunk_size, size, size, 3),
                dtype="uint8",
                compressors=ZstdCodec(level=3),
                fill_value=0,
                dimension_names=CROP_DIMENSIONS,
            )
        group.attrs["zeroseg"] = asdict(meta)
        (Path(path) / MANIFEST_DIR).mkdir(exist_ok=True)
        return cls(path, group)

    @property
    def features(self) -> zarr.Array:
        return self.group[FEATURES]

    @property
    def crops(self) -> zarr.Array:
        return self.group[CROPS]

    def save_meta(self) -> None:
        self.group.attrs["zeroseg"] = asdict(self.meta)

    # --- manifest -------------------------------------------------------------------------------

    def part_path(self, shard: int) -> Path:
        return self.path / MANIFEST_DIR / f"shard-{shard:06d}.parquet"

    def committed_shards(self) -> set[int]:
        names = (p.name for p in (self.path / MANIFEST_DIR).glob("shard-*.parquet"))
        return {int(name[len("shard-") : -len(".parquet")]) for name in names}

    def manifest(
        self, columns: list[str] | None = None, each: Callable[[pa.Table, Path], pa.Table] | None = None
    ) -> pa.Table:
        """The union of all committed parts in shard order (an empty table with the schema when there are
        none). Parts are read by a thread pool (Parquet decoding releases the GIL; on a network filesystem
        the reads overlap), each with only the wanted columns and passed through `each(table, part path)`
        (a filter or a compact encoding, so the whole manifest never exists in its plain form)."""
        parts = sorted((self.path / MANIFEST_DIR).glob("shard-*.parquet"))
        each = each or (lambda table, part: table)
        if not parts:
            empty = MANIFEST_SCHEMA.empty_table().select(columns or MANIFEST_SCHEMA.names)
            return each(empty, self.path / MANIFEST_DIR)

        def read(part: Path) -> pa.Table:
            return each(pq.read_table(part, columns=columns, schema=MANIFEST_SCHEMA), part)

        with ThreadPoolExecutor(MANIFEST_READERS) as pool:
            return pa.concat_tables(list(pool.map(read, parts)))

    # --- writing shards -------------------------------------------------------------------------

    def shard_rows(self, shard: int) -> int:
        return shard * self.meta.shard_size

    def reserve(self, shard: int, count: int) -> None:
        """Grow the arrays so that shard `shard` can hold `count` images (before any process writes it)."""
        needed = self.shard_rows(shard) + count
        for array in (self.features, self.crops) if self.meta.stored_crops else (self.features,):
            if array.shape[0] < needed:
                array.resize((needed, *array.shape[1:]))

    def write_shard(self, shard: int, features: np.ndarray, crops: np.ndarray | None) -> None:
        """A shard's features (n, V, D) and, in stores that keep them, its crops (n, S, S, 3)."""
        start = self.shard_rows(shard)
        arrays = [(FEATURES, features)] + ([(CROPS, crops)] if self.meta.stored_crops else [])
        for name, values in arrays:
            self.group[name][start : start + len(values)] = values
            self._sync_chunks(name, start, len(values))

    def _sync_chunks(self, name: str, start: int, count: int) -> None:
        """Flush a row range's chunk files to disk, so a part committed after them survives a power loss."""
        array, chunk = self.group[name], self.meta.chunk_size
        for index in range(start // chunk, (start + count - 1) // chunk + 1):
            key = array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))
            path = self.path / name / key
            if path.exists():  # Zarr writes no file for a chunk of fill values (a shard of failed images)
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())

    def commit(self, shard: int, rows: pa.Table) -> None:
        """Publish a shard: its manifest part appears atomically, after its features."""
        final = self.part_path(shard)
        with atomic_path(final) as partial:
            pq.write_table(rows.cast(MANIFEST_SCHEMA), partial)


def manifest_rows(shard: int, first_row: int, records: list[dict]) -> pa.Table:
    """A shard's manifest part from per-image records (key, source, sha256, width, height, error)."""
    now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC"))
    columns = {name: [] for name in MANIFEST_SCHEMA.names}
    for i, record in enumerate(records):
        failed = record.get("error") is not None
        columns["row"].append(None if failed else first_row + i)
        columns["key"].append(record["key"])
        columns["source"].append(record["source"])
        columns["sha256"].append(record.get("sha256"))
        columns["width"].append(record.get("width"))
        columns["height"].append(record.get("height"))
        columns["status"].append("error" if failed else "ok")
        columns["error"].append(record.get("error"))
        columns["shard"].append(shard)
        columns["time"].append(now)
    return pa.table(columns, schema=MANIFEST_SCHEMA)


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
