"""`zs-cache inspect` and `zs-cache verify`: what a store holds, and whether it is whole."""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from zeroseg.pipeline.errors import UserError
from zeroseg.pipeline.integrity import damaged_chunks, has_checksums
from zeroseg.pipeline.store import MANIFEST_SCHEMA, FeatureStore


def disk_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe(store: FeatureStore) -> list[str]:
    """Human-readable lines: counts, teacher, grids, size on disk, error summary."""
    meta = store.meta
    manifest = store.manifest(columns=["status", "error", "source", "shard"])
    status = Counter(manifest.column("status").to_pylist())
    teacher = meta.teacher
    weights = f" sha256={teacher['weights_sha256']}" if teacher["weights_sha256"] else ""
    lines = [
        f"store      {store.path}",
        f"images     {status.get('ok', 0)} ok, {status.get('error', 0)} errors, "
        f"{len(set(manifest.column('shard').to_pylist()))} shards (shard size {meta.shard_size})",
        f"teacher    {teacher['model']} pretrained={teacher['pretrained'] or 'none (random weights)'} "
        f"quick_gelu={teacher['quick_gelu']}{weights}",
        f"views      grids {','.join(map(str, meta.grids))} -> {meta.num_views} views of "
        f"{meta.preprocessing['view_size']}px from {meta.preprocessing['crop_size']}px centre crops",
        f"features   {tuple(store.features.shape)} float16, dim {meta.embed_dim}, chunks of {meta.chunk_size} images",
        f"disk       {disk_size(store.path) / 2**20:.1f} MiB",
    ]
    if meta.stored_crops:
        lines.insert(-1, f"crops      {tuple(store.crops.shape)} uint8, the centre crops the teacher saw")
    lines.insert(-1, f"checksums  {checksum_line(store)}")
    per_source = Counter(manifest.column("source").to_pylist())
    for name, spec in meta.sources.items():
        lines.append(f"source     {name}: {spec['kind']} {spec['path']} ({per_source.get(name, 0)} images)")
    errors = manifest.filter(pc.equal(manifest.column("status"), "error")).column("error").to_pylist()
    for reason, count in Counter(e.split(":")[0] for e in errors).most_common(10):
        lines.append(f"errors     {count} x {reason}")
    return lines


@dataclass
class Damage:
    """What `find_damage` found: problem lines, the shards they make damaged (redone by zs-cache build --repair),
    and counts."""

    problems: list[str] = field(default_factory=list)
    shards: dict[int, list[str]] = field(default_factory=dict)  # damaged shard -> its problems
    unrepairable: list[str] = field(default_factory=list)  # problems of no single shard (a stray file, duplicates)
    counts: dict = field(default_factory=dict)

    def add(self, problem: str, shard: int | None = None) -> None:
        self.problems.append(problem)
        if shard is None:
            self.unrepairable.append(problem)
        else:
            self.shards.setdefault(shard, []).append(problem)


def verify(store: FeatureStore, progress: bool = True) -> tuple[list[str], dict]:
    """Problems found (empty when whole) and counts; see `find_damage`."""
    damage = find_damage(store, progress)
    return damage.problems, damage.counts


def checksum_line(store: FeatureStore) -> str:
    """Whether the store's chunks and parts can tell damage (stores made before checksums cannot)."""
    arrays = store.arrays()
    checked = [name for name, array in arrays.items() if has_checksums(array)]
    recorded = sum(store.chunk_record(path) is not None for path in store.parts().values())
    chunks = (f"crc32c on every chunk of {' and '.join(checked)}" if len(checked) == len(arrays)
              else "chunks UNCHECKED (store made before chunk checksums: damage shows only as bad values)")
    return f"{chunks}; {recorded} of {len(store.parts())} shards have a commit record"


def find_damage(store: FeatureStore, progress: bool = True) -> Damage:
    """Every manifest part readable (page checksums) with its chunk files present and unchanged (commit record);
    manifest and array agree: every ok row exactly once, inside its shard's rows and the array, with finite,
    written features that decode (chunk checksums)."""
    damage = Damage()
    try:
        parts = store.parts()
    except UserError as exc:
        damage.add(str(exc))
        return damage
    tables, unchecked = [], 0
    for shard, path in parts.items():
        try:
            tables.append(store.read_part(path))
            record = store.chunk_record(path)
        except UserError as exc:
            damage.add(str(exc), shard)
            continue
        if record is None:
            unchecked += 1
        for problem in damaged_chunks(store.path, record or {}):
            damage.add(f"shard {shard}: {problem}", shard)
    manifest = pa.concat_tables(tables) if tables else MANIFEST_SCHEMA.empty_table()
    _check_manifest(store, manifest, damage)
    damage.counts["unchecked_shards"] = unchecked
    if not damage.problems:
        _check_features(store, manifest, damage, progress)
    return damage


def _check_manifest(store: FeatureStore, manifest: pa.Table, damage: Damage) -> None:
    meta = store.meta
    table = manifest.to_pydict()
    rows, status = table["row"], table["status"]
    ok_rows = [r for r, s in zip(rows, status) if s == "ok"]
    damage.counts.update(ok=len(ok_rows), error=status.count("error"), shards=len(set(table["shard"])))
    for key, source, row, st, shard in zip(table["key"], table["source"], rows, status, table["shard"]):
        if st not in ("ok", "error"):
            damage.add(f"{source}/{key}: unknown status '{st}'", shard)
        elif st == "ok" and row is None:
            damage.add(f"{source}/{key}: status ok without a row", shard)
        elif st == "error" and row is not None:
            damage.add(f"{source}/{key}: status error with row {row}", shard)
        elif row is not None and not shard * meta.shard_size <= row < (shard + 1) * meta.shard_size:
            damage.add(f"{source}/{key}: row {row} outside shard {shard}", shard)
        elif row is not None and row >= store.features.shape[0]:
            damage.add(f"{source}/{key}: row {row} beyond the features array ({store.features.shape[0]} rows)", shard)
        if source not in meta.sources:
            damage.add(f"{source}/{key}: source '{source}' is not registered in the store metadata", shard)
    for row, times in Counter(ok_rows).items():
        if times > 1:
            damage.add(f"row {row} is claimed by {times} manifest rows")
    for (source, key), times in Counter(zip(table["source"], table["key"])).items():
        if times > 1:
            damage.add(f"{source}/{key} appears {times} times")


def _check_features(store: FeatureStore, manifest: pa.Table, damage: Damage, progress: bool) -> None:
    """Decode every chunk holding ok rows (checksums checked by Zarr); those rows finite and written."""
    features, chunk, shard_size = store.features, store.meta.chunk_size, store.meta.shard_size
    ok = manifest.filter(pc.equal(manifest["status"], "ok"))["row"].to_pylist()
    by_chunk: dict[int, list[int]] = {}
    for row in ok:
        by_chunk.setdefault(row // chunk, []).append(row)
    for index in tqdm(sorted(by_chunk), desc="verify", unit="chunk", disable=not progress):
        start = index * chunk
        shard = start // shard_size
        try:
            block = features[start : min(start + chunk, features.shape[0])]  # (c, V, D)
        except ValueError as exc:
            damage.add(f"shard {shard}: chunk {index} of features does not decode ({exc})", shard)
            continue
        local = np.array(by_chunk[index]) - start
        values = block[local]
        bad = ~np.isfinite(values).all(axis=(1, 2))
        empty = ~np.any(values, axis=(1, 2))
        for i in local[bad]:
            damage.add(f"row {start + i}: NaN or Inf in features", shard)
        for i in local[empty]:
            damage.add(f"row {start + i}: features never written (all zero)", shard)
