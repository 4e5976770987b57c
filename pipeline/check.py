"""`zs-cache inspect` and `zs-cache verify`: what a store holds, and whether it is whole."""

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr
from tqdm import tqdm
from zarr.storage import LocalStore, WrapperStore

from zeroseg.errors import UserError
from zeroseg.io import human_size
from zeroseg.pipeline.integrity import chunk_crc32c, chunk_key
from zeroseg.pipeline.manifest import name_digests, name_list, repeated_names, repeated_rows
from zeroseg.pipeline.store import FEATURES, MANIFEST_READERS, FeatureStore, committed_parts
from zeroseg.runtime import bar_disabled, prefetch_map


def disk_size(path: Path) -> int:
    """Bytes of the files under `path` (os.scandir: a store has a file per chunk, often millions); a file removed
    while they are counted (readers take no lock) is not counted."""
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                total += disk_size(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:  # removed since listed: a manifest part that a compact replaced
                    continue
    return total


def describe(store: FeatureStore) -> list[str]:
    """Human-readable lines: counts, teacher, grids, size on disk, error summary."""
    meta = store.meta
    manifest = store.manifest(columns=["status", "error", "source", "shard"])
    status = value_counts(manifest["status"])
    teacher = meta.teacher
    weights = f" sha256={teacher.weights_sha256}" if teacher.weights_sha256 else ""
    decode_device = meta.preprocessing.decode_device
    on_device = f" on {decode_device}" if decode_device else ""
    lines = [
        f"store      {store.path}",
        f"images     {status.get('ok', 0)} ok, {status.get('error', 0)} errors, "
        f"{len(pc.unique(manifest['shard']))} shards (shard size {meta.shard_size})",
        f"teacher    {teacher.describe()}{weights}",
        f"views      grids {','.join(map(str, meta.grids))} -> {meta.num_views} views of "
        f"{meta.preprocessing.view_size}px from {meta.preprocessing.crop_size}px centre crops "
        f"({meta.preprocessing.decode} decode{on_device})",
        f"features   {tuple(store.features.shape)} float16, dim {meta.embed_dim}, chunks of {meta.chunk_size} images",
        f"disk       {human_size(disk_size(store.path))}",
    ]
    if meta.stored_crops:
        lines.insert(-1, f"crops      {tuple(store.crops.shape)} uint8, the centre crops the teacher saw")
    lines.insert(-1, f"checksums  crc32c on every chunk of {' and '.join(store.arrays())}; a commit record for each "
                     f"of the {len(store.records())} shards")
    per_source = value_counts(manifest["source"])
    for name, spec in meta.sources.items():
        lines.append(f"source     {name}: {spec.kind} {spec.path} ({per_source.get(name, 0)} images)")
    errors = manifest.filter(pc.equal(manifest.column("status"), "error")).column("error").to_pylist()
    for reason, count in Counter(e.split(":")[0] for e in errors).most_common(10):
        lines.append(f"errors     {count} x {reason}")
    return lines


def value_counts(column) -> dict:
    """{value: count} of a manifest column, counted in Arrow."""
    return {item["values"]: item["counts"] for item in pc.value_counts(column).to_pylist()}


@dataclass
class Damage:
    """What `find_damage` found: problem lines, the shards they make damaged (redone by zs-cache build --repair),
    and counts."""

    problems: list[str] = field(default_factory=list)
    shards: dict[int, list[str]] = field(default_factory=dict)  # damaged shard -> its problems
    unrepairable: list[str] = field(default_factory=list)  # problems of no single shard (a stray file, duplicates)
    counts: dict = field(default_factory=dict)
    unread_parts: bool = False  # some part did not read (find_damage checks again when the parts changed)

    def add(self, problem: str, shard: int | None = None) -> None:
        self.add_to_shards(problem, [] if shard is None else [shard])

    def add_to_shards(self, problem: str, shards) -> None:
        """One problem that makes every one of `shards` damaged (none: unrepairable)."""
        self.problems.append(problem)
        if not shards:
            self.unrepairable.append(problem)
        for shard in shards:
            self.shards.setdefault(shard, []).append(problem)

    def add_unread(self, problem: str, shards) -> None:
        """A part that did not read (or listing them failed): damage, unless a compact replaced the parts."""
        self.unread_parts = True
        self.add_to_shards(problem, shards)


def verify(store: FeatureStore, progress: bool = True) -> tuple[list[str], dict]:
    """Problems found (empty when whole) and counts; see `find_damage`."""
    damage = find_damage(store, progress)
    return damage.problems, damage.counts


VERIFIED_COLUMNS = ["row", "key", "source", "status", "shard"]
VERIFY_AHEAD_ROWS = 2**18  # manifest rows read ahead (parts of single shards: 16 at a time; compacted parts: 2)


def find_damage(store: FeatureStore, progress: bool = True) -> Damage:
    """Every manifest part readable (page checksums) with its chunk files present and unchanged (commit record);
    manifest and array agree: every ok row exactly once, inside its shard's rows and the array, with finite,
    written features that decode (chunk checksums).

    Part by part: the manifest's checks are array operations on one part at a time (parts of about
    VERIFY_AHEAD_ROWS rows together read ahead by threads), and what the whole manifest must agree on is kept
    as 16 bytes per row (the ok rows, and a digest of each image's name: manifest.name_digests). The features are
    read a block of whole chunks at a time (at most VERIFY_BLOCK_BYTES decompressed), each chunk once. So time
    stays near one pass over the store and memory near 16 bytes per manifest row whatever the number of rows.

    Like every reader it takes no lock: when a part did not read and the parts changed meanwhile (a compact
    replaced them), the manifest is listed and checked again (FeatureStore.while_stable, as every reader
    does), before any chunk is read."""
    checked = store.while_stable(lambda: _check_manifest(store), failed=lambda result: result.damage.unread_parts)
    _check_chunks(store, checked, progress)
    return checked.damage


@dataclass
class CheckedManifest:
    """What the manifest pass of `find_damage` leaves for the chunk checks."""

    damage: Damage
    ok_rows: np.ndarray  # (n,) int64, sorted: the ok rows of every part
    recorded: dict[str, tuple[str, int]]  # features chunk key -> (crc32c in its commit record, shard)
    others: dict[int, dict]  # shard -> its commit record of the other arrays (crops)


def _check_manifest(store: FeatureStore) -> CheckedManifest:
    """The parts listed and read and their rows checked; their commit records kept for the chunk checks."""
    damage = Damage()
    unreadable: list = []
    recorded: dict[str, tuple[str, int]] = {}
    others: dict[int, dict] = {}
    try:
        parts, leftovers = committed_parts(store.listed_parts(unreadable))
    except UserError as exc:
        damage.add_unread(str(exc), [])
        return CheckedManifest(damage, np.zeros(0, np.int64), recorded, others)
    held = {shard for shards in parts.values() for shard in shards}
    for path in unreadable:
        try:
            store.part_records(path)
        except UserError as exc:
            damage.add_unread(str(exc), store.unreadable_shards(path, held))

    def read(path: Path) -> tuple[pa.Table, dict] | UserError:
        try:
            return store.read_part(path).select(VERIFIED_COLUMNS), store.part_records(path)  # every page checked
        except UserError as exc:
            return exc

    totals = Counter(ok=0, error=0)
    ok_rows, digests, sizes, shards_seen = [], [], {}, set()
    largest = store.meta.shard_size * max((len(shards) for shards in parts.values()), default=1)  # rows per part
    ahead = max(1, min(2 * MANIFEST_READERS, VERIFY_AHEAD_ROWS // largest))
    read_ahead = prefetch_map(read, parts, MANIFEST_READERS, ahead)
    batch: list[pa.Table] = []  # parts read but not yet checked: checked together (few calls per row, not per part)

    def check_batch() -> None:
        if batch:
            rows = pa.concat_tables(batch)
            ok_rows.append(_check_rows(store, rows, damage, totals))
            digests.append(name_digests(rows["source"], rows["key"]))
            batch.clear()

    for (path, shards), read_back in zip(parts.items(), read_ahead):
        if isinstance(read_back, UserError):
            damage.add_unread(str(read_back), shards)
            continue
        table, records = read_back
        for shard, record in records.items():
            record = dict(record)
            for key, crc in record.pop(FEATURES, {}).items():  # compared when the chunk is decoded: read once
                recorded[key] = (crc, shard)
            others[shard] = record
        found = np.unique(table["shard"].to_numpy().astype(np.int64))
        foreign = np.setdiff1d(found, shards)
        if len(foreign):
            damage.add_to_shards(f"manifest part '{path}' holds rows of shard {foreign[0]}, which it does not record",
                                 shards)  # fmt: skip
        shards_seen.update(found.tolist())
        sizes[path] = table.num_rows
        batch.append(table)
        if sum(part.num_rows for part in batch) >= VERIFY_AHEAD_ROWS:
            check_batch()
    check_batch()
    ok_rows = np.sort(np.concatenate(ok_rows)) if ok_rows else np.zeros(0, np.int64)
    for row, times in repeated_rows(ok_rows).items():
        damage.add(f"row {row} is claimed by {times} manifest rows")
    try:
        names = repeated_names(np.concatenate(digests) if digests else np.zeros(0, np.uint64),
                               lambda indices: names_at(store, sizes, indices))  # fmt: skip
    except UserError as exc:  # a part read again to name its repeated images is gone (a compact) or damaged since
        damage.add_unread(str(exc), [])
        names = {}
    for name, times in names.items():
        damage.add(f"{name} appears {times} times")
    damage.counts.update(ok=totals["ok"], error=totals["error"], shards=len(shards_seen))
    if leftovers:
        damage.counts["leftover_parts"] = len(leftovers)
    return CheckedManifest(damage, ok_rows, recorded, others)


def _check_chunks(store: FeatureStore, checked: CheckedManifest, progress: bool) -> None:
    """The chunk files the commit records name: the other arrays' present and unchanged; the features' present,
    and (when the manifest is whole) decoded with the rows they hold checked, those not decoded compared."""
    damage, recorded = checked.damage, checked.recorded
    for shard, record in checked.others.items():
        for problem in damaged_chunks(store.path, {FEATURES: {}, **record}):
            damage.add(f"shard {shard}: {problem}", shard)
    for key in [key for key in recorded if not (store.path / FEATURES / key).is_file()]:
        crc, shard = recorded.pop(key)
        damage.add(f"shard {shard}: chunk {FEATURES}/{key} is missing", shard)
    if not damage.problems:
        _check_features(store, checked.ok_rows, recorded, damage, progress)
    for key, (crc, shard) in recorded.items():  # chunks not decoded: no ok row in them, or other damage first
        for problem in damaged_chunks(store.path, {FEATURES: {key: crc}}):
            damage.add(f"shard {shard}: {problem}", shard)


def names_at(store: FeatureStore, sizes: dict[Path, int], indices: np.ndarray) -> list[str]:
    """'source/key' of the manifest rows `indices` (ascending; counted over the parts of `sizes` in order)."""
    names, first = [], 0
    for path, size in sizes.items():
        local = indices[(indices >= first) & (indices < first + size)] - first
        if len(local):
            names += name_list(store.read_part(path, ["source", "key"]), local)
        first += size
    return names


def _check_rows(store: FeatureStore, part: pa.Table, damage: Damage, totals: Counter) -> np.ndarray:
    """Add the row disagreements of consecutive manifest rows `part` to `damage` (each with its shard) and their
    counts to `totals`; returns their ok rows."""
    meta = store.meta
    status = part["status"]
    has_row = part["row"].is_valid().to_numpy(zero_copy_only=False)  # (n,) bool
    rows = part["row"].fill_null(-1).to_numpy()  # (n,) int64
    shard = part["shard"].to_numpy().astype(np.int64)
    is_ok = pc.fill_null(pc.equal(status, "ok"), False).to_numpy(zero_copy_only=False)
    is_error = pc.fill_null(pc.equal(status, "error"), False).to_numpy(zero_copy_only=False)
    totals.update(ok=int(is_ok.sum()), error=int(is_error.sum()))

    length = store.features.shape[0]
    first_row = shard * meta.shard_size
    row_checks = [  # (rows failing, message); like an elif chain, a row reports its first failure only
        (~(is_ok | is_error), lambda i: f"unknown status '{status[i].as_py()}'"),
        (is_ok & ~has_row, lambda i: "status ok without a row"),
        (is_error & has_row, lambda i: f"status error with row {rows[i]}"),
        (has_row & ((rows < first_row) | (rows >= first_row + meta.shard_size)),
         lambda i: f"row {rows[i]} outside shard {shard[i]}"),
        (has_row & (rows >= length), lambda i: f"row {rows[i]} beyond the features array ({length} rows)"),
    ]  # fmt: skip
    reported = np.zeros(len(rows), dtype=bool)
    found: list[tuple[int, str]] = []  # (index in `part`, message), reported in manifest order
    for failing, message in row_checks:
        for i in np.flatnonzero(failing & ~reported):
            found.append((int(i), message(int(i))))
        reported |= failing
    unregistered = pc.invert(pc.is_in(part["source"], pa.array(list(meta.sources), pa.string())))
    found += [(int(i), f"source '{part['source'][int(i)].as_py()}' is not registered in the store metadata")
              for i in np.flatnonzero(unregistered.to_numpy(zero_copy_only=False))]  # fmt: skip
    for i, text in sorted(found):
        damage.add(f"{part['source'][i].as_py()}/{part['key'][i].as_py()}: {text}", int(shard[i]))
    return rows[is_ok & has_row]


VERIFY_BLOCK_BYTES = 64 * 2**20


def _check_features(
    store: FeatureStore, ok_rows: np.ndarray, recorded: dict[str, tuple[str, int]], damage: Damage, progress: bool
) -> None:
    """Decode every chunk holding one of the sorted `ok_rows` (checksums checked by Zarr), a block of whole chunks
    per read; those rows finite and written. The payload crc32c of each chunk file, taken from the bytes Zarr read, is
    compared with its commit record (`recorded`, whose keys are removed as they are compared). A block that
    fails to decode is read again chunk by chunk, so each problem names its damaged chunk."""
    features, noted = checksumming_array(store.path, FEATURES)
    chunk, shard_size = store.meta.chunk_size, store.meta.shard_size
    row_bytes = int(np.prod(features.shape[1:])) * features.dtype.itemsize
    block = chunk * max(1, VERIFY_BLOCK_BYTES // (row_bytes * chunk))  # rows per read, whole chunks
    changed: set[int] = set()  # chunks whose crc32c differs from their record (reported)

    def compare(indices: np.ndarray) -> None:
        """Chunks `indices` just read: their crc32c (of the bytes Zarr read) against their commit records."""
        for index in indices.tolist():
            key = chunk_key(features, index)
            crc, expected = noted.noted.get(f"{FEATURES}/{key}"), recorded.get(key)
            if crc is None or expected is None:  # a chunk never written, or one no record lists
                continue
            del recorded[key]
            if crc != expected[0]:
                damage.add(f"shard {expected[1]}: chunk {FEATURES}/{key} is damaged (crc32c differs from its commit "
                           f"record)", expected[1])  # fmt: skip
                changed.add(index)
        noted.noted.clear()

    for start in tqdm(np.unique(ok_rows // block) * block, desc="verify", unit="block", disable=bar_disabled(progress)):
        lo, hi = np.searchsorted(ok_rows, [start, start + block])
        wanted = ok_rows[lo:hi]
        try:
            values = features[int(start) : int(wanted[-1]) + 1][wanted - start]  # (n, V, D)
        except ValueError:  # some chunk of the block does not decode: find which
            values = None
        compare(np.unique(wanted // chunk))
        if values is not None:
            _check_values(wanted, values, shard_size, damage)
            continue
        for index in np.unique(wanted // chunk):
            first = int(index) * chunk
            rows = wanted[(wanted >= first) & (wanted < first + chunk)]
            try:
                values = features[first : int(rows[-1]) + 1][rows - first]  # (n, V, D)
            except ValueError as exc:
                if index not in changed:
                    damage.add(f"shard {first // shard_size}: chunk {index} of features does not decode ({exc})",
                               first // shard_size)  # fmt: skip
                continue
            _check_values(rows, values, shard_size, damage)
        noted.noted.clear()


def _check_values(rows: np.ndarray, values: np.ndarray, shard_size: int, damage: Damage) -> None:
    """Rows whose features `values` (n, V, D) hold NaN/Inf or were never written."""
    bad = ~np.isfinite(values).all(axis=(1, 2))
    empty = ~np.any(values, axis=(1, 2))
    for row in rows[bad]:
        damage.add(f"row {row}: NaN or Inf in features", int(row) // shard_size)
    for row in rows[empty]:
        damage.add(f"row {row}: features never written (all zero)", int(row) // shard_size)


def damaged_chunks(store_path: Path, record: dict[str, dict[str, str]]) -> list[str]:
    """One problem line per recorded chunk file that is missing or is not the file its record names."""
    problems = []
    for name, files in record.items():
        for key, expected in files.items():
            path = store_path / name / key
            if not path.is_file():
                problems.append(f"chunk {name}/{key} is missing")
            elif chunk_crc32c(path.read_bytes()) != expected:
                problems.append(f"chunk {name}/{key} is damaged (crc32c differs from its commit record)")
    return problems


class ChecksummingStore(WrapperStore):
    """A read-only local Zarr store that notes the payload crc32c of every whole file it hands to Zarr (`noted`:
    key relative to the store -> `chunk_crc32c`), so that `verify` reads each chunk once to both decode it and
    compare it with its commit record."""

    def __init__(self, root: Path):
        super().__init__(LocalStore(root, read_only=True))
        self.noted: dict[str, str] = {}

    async def get(self, key, prototype=None, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if value is not None and byte_range is None:
            self.noted[key] = chunk_crc32c(value.to_bytes())
        return value


def checksumming_array(store_path: Path, name: str) -> tuple[zarr.Array, ChecksummingStore]:
    """Store array `name` read through a ChecksummingStore, and that store."""
    store = ChecksummingStore(store_path)
    return zarr.open_array(store=store, path=name, mode="r"), store
