"""The feature store: a Zarr array of grid-view features plus a Parquet manifest, shard by shard.

Layout of a store directory (readable with plain zarr and pyarrow):
  zarr.json              Zarr group; attribute "zeroseg" holds the metadata (pipeline.store_meta.StoreMeta); the
                         arrays' metadata consolidated (for other readers: `consolidate`)
  features/              Zarr array (N, V, D) float16, dimensions (image, view, dim), chunks of `chunk_size`
                         whole images, zstd + crc32c
  crops/                 only in stores made with --store-crops: Zarr array (N, S, S, 3) uint8, dimensions
                         (image, y, x, channel), the centre crops the teacher saw, chunked and compressed
                         like features
  manifest/shard-NNNNNN.parquet  one part per committed shard (Parquet page checksums; the shard's chunk
                         files and their crc32c in the key-value metadata, see pipeline.integrity); their
                         union is the manifest (rows: pipeline.manifest). Any other non-dot file there is
                         refused: a stray copy of a part would duplicate its rows.
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
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr
from filelock import FileLock, Timeout
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.errors import ZarrUserWarning

from zeroseg.errors import DAMAGED, UserError, first_line
from zeroseg.io import atomic_path, remove_dead_partials
from zeroseg.pipeline.integrity import (
    chunk_key,
    decode_record,
    decode_shard_records,
    encode_record,
    encode_shard_records,
    has_checksums,
    shard_record,
)
from zeroseg.pipeline.manifest import MANIFEST_SCHEMA, name_list, refuse_duplicates
from zeroseg.pipeline.store_meta import FORMAT_VERSION, StoreMeta

MANIFEST_DIR = "manifest"
# Zarr dimension names, so that xarray.open_zarr(store) reads both arrays
FEATURE_DIMENSIONS = ("image", "view", "dim")
CROP_DIMENSIONS = ("image", "y", "x", "channel")
LOCK_FILE = ".lock"
FEATURES = "features"
CROPS = "crops"
MANIFEST_READERS = 8  # threads reading manifest parts
READ_ATTEMPTS = 3  # listings of the parts while a compact changes them
PART_ROW_GROUP = 4096  # rows per Parquet row group of a part: the trainer reads a chunk's records from one or two
T = TypeVar("T")
PART_NAME = re.compile(r"shard-(\d{6,})\.parquet")
COMPACTED_NAME = re.compile(r"shards-(\d{6,})-(\d{6,})\.parquet")
PART_FILE = re.compile(rf"{PART_NAME.pattern}|{COMPACTED_NAME.pattern}")

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
            raise UserError(f"store '{path}' has format {version}; this zeroseg reads format {FORMAT_VERSION}: "
                            f"rebuild it with zs-cache build")  # fmt: skip
        for array in arrays:  # every chunk ends in its crc32c: without the codec, zstd would read that trailer
            if not has_checksums(array):
                raise UserError(f"'{Path(path) / array.path / 'zarr.json'}' lacks the crc32c codec of its chunks "
                                f"({DAMAGED})")
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
        store = cls(path, group)
        store.consolidate()
        return store

    @property
    def features(self) -> zarr.Array:
        return self.group[FEATURES]

    @property
    def crops(self) -> zarr.Array:
        return self.group[CROPS]

    def save_meta(self) -> None:
        self.group.attrs["zeroseg"] = self.meta.to_attribute()
        self.consolidate()  # writing the attribute wrote the root zarr.json without the arrays' metadata

    def consolidate(self) -> None:
        """Copy the arrays' metadata into the root zarr.json (zarr's consolidated metadata), so that a reader opening
        the group by default (xarray.open_zarr, zarr.open_group) does not list the folder and warn that manifest/ and
        .lock are not Zarr. Done after every change of the arrays' shapes or of the attribute, before any shard is
        committed in new rows: a consolidated shape is never larger than its array, and holds every committed row.
        Our own opens ignore it (use_consolidated=False)."""
        with warnings.catch_warnings():  # its own listing's warnings, and that v3 has no consolidation in its spec
            warnings.simplefilter("ignore", ZarrUserWarning)
            zarr.consolidate_metadata(str(self.path))

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
            if path.name.startswith("."):  # partial writes (zeroseg.io)
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
        """Committed shard -> the manifest part holding it (listed again when a compact removed one meanwhile)."""
        listed = self.while_stable(self.part_files)
        return {shard: part for part, shards in listed.items() for shard in shards}

    def committed_shards(self) -> set[int]:
        return set(self.parts())

    def read_part(self, path: Path, columns: list[str] | None = None, rows: range | None = None) -> pa.Table:
        """One manifest part, its page checksums verified and its columns exactly the manifest's (a damaged
        footer could rename one, which a schema-evolving read would fill with nulls); UserError naming it.
        rows: only the part's rows whose features row lies in `rows` (`row` must be among the columns), read
        from the row groups whose statistics say they may hold them."""
        try:
            part = pq.ParquetFile(path, page_checksum_verification=True)
            found = [(f.name, f.type) for f in part.schema_arrow]
            if found != [(f.name, f.type) for f in MANIFEST_SCHEMA]:
                raise ValueError(f"its columns are {', '.join(f'{name}: {kind}' for name, kind in found)}")
            if rows is None:
                return part.read(columns=columns)
            column = MANIFEST_SCHEMA.get_field_index("row")
            held = part.metadata
            groups = [g for g in range(held.num_row_groups) if _may_hold(held.row_group(g).column(column), rows)]
            table = part.read_row_groups(groups, columns=columns)
            return table.filter(pc.and_(pc.greater_equal(table["row"], rows.start), pc.less(table["row"], rows.stop)))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise damaged_part(path, exc) from None

    def part_records(self, path: Path) -> dict[int, dict[str, dict[str, str]]]:
        """Shard -> commit record of each shard in part `path` (one for a single part, several for a compacted one)."""
        return self.part_footer(path)[0]

    def part_footer(self, path: Path) -> tuple[dict[int, dict[str, dict[str, str]]], int]:
        """(part_records of part `path`, its number of rows), from one read of its footer (pipeline.integrity)."""
        try:
            metadata = pq.read_metadata(path)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise damaged_part(path, exc) from None
        match = PART_NAME.fullmatch(path.name)
        if match is not None:
            return {int(match.group(1)): decode_record(metadata.metadata, path)}, metadata.num_rows
        return decode_shard_records(metadata.metadata, path), metadata.num_rows

    def records(self) -> dict[int, dict[str, dict[str, str]]]:
        """Committed shard -> its commit record, the parts' footers read by a thread pool."""

        def read() -> dict[int, dict[str, dict[str, str]]]:
            with ThreadPoolExecutor(MANIFEST_READERS) as pool:
                held = list(pool.map(self.part_records, self.part_files()))
            return {shard: record for records in held for shard, record in records.items()}

        return self.while_stable(read)

    def while_stable(self, read: Callable[[], T], failed: Callable[[T], bool] = lambda result: False) -> T:
        """read() of the parts, listed and read again when it failed (raised a UserError, or failed(result)) and they
        changed meanwhile (readers take no lock: a compact may replace parts while they are read), at most
        READ_ATTEMPTS times; its last UserError or result otherwise."""
        for attempt in range(1, READ_ATTEMPTS + 1):
            names = self.part_names()
            try:
                result = read()
            except UserError:
                if attempt == READ_ATTEMPTS or self.part_names() == names:
                    raise
                continue
            if not failed(result) or attempt == READ_ATTEMPTS or self.part_names() == names:
                return result

    def part_names(self) -> list[str]:
        """The names of the files in manifest/ now (not the partial writes): a reader that takes no lock compares
        them before and after a failed read to tell damage from a compact that replaced the parts meanwhile."""
        return sorted(name for name in os.listdir(self.path / MANIFEST_DIR) if not name.startswith("."))

    def remove_partial_parts(self) -> None:
        """Delete the temporary files of parts whose writer died before renaming them (a killed build or compact;
        zeroseg.io.remove_dead_partials, the rule for every folder zeroseg writes into)."""
        remove_dead_partials(self.path / MANIFEST_DIR, PART_FILE)

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

        table = self.while_stable(read)
        if unique:
            refuse_duplicates(self.path, table, self.names_of_rows)
        return table

    def names_of_rows(self, rows: np.ndarray) -> list[str]:
        """'source/key' of the images of features rows `rows` (each held by one manifest row), in their order."""
        table = self.manifest(["row", "source", "key"], unique=False)
        table = table.filter(pc.is_in(table["row"], pa.array(rows)))
        names = dict(zip(table["row"].to_pylist(), name_list(table, np.arange(table.num_rows))))
        return [names[row] for row in rows.tolist()]

    def required_chunks(self) -> dict[str, set[int]]:
        """Array -> indices of the chunks whose files must exist (Zarr would read a lost one as zeros): those the
        commit records list."""
        arrays = self.arrays()
        required: dict[str, set[int]] = {name: set() for name in arrays}
        per_shard = self.meta.shard_size // self.meta.chunk_size
        for shard, record in self.records().items():
            first = shard * per_shard
            for name, array in arrays.items():
                files = record.get(name, {})
                required[name].update(i for i in range(first, first + per_shard) if chunk_key(array, i) in files)
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
        self.consolidate()  # also when a build killed before consolidating had already grown them

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


def _may_hold(column: pq.ColumnChunkMetaData, rows: range) -> bool:
    """Whether a row group's `row` column chunk may hold a value in `rows` (yes when it has no statistics)."""
    stats = column.statistics
    if stats is None or not stats.has_min_max:
        return True
    return stats.min < rows.stop and stats.max >= rows.start


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
        raise UserError(
            f"store '{path}' is being written by another zs-cache build or compact; wait for it to finish"
        ) from None
    try:
        yield
    finally:
        if {entry.name for entry in path.iterdir()} == {LOCK_FILE}:
            (path / LOCK_FILE).unlink()
            if made_folder:
                path.rmdir()
        lock.release()
