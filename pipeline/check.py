"""`zs-cache inspect` and `zs-cache verify`: what a store holds, and whether it is whole."""

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm

from zeroseg.pipeline.sizes import human_size
from zeroseg.pipeline.store import FeatureStore


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
        f"disk       {human_size(disk_size(store.path))}",
    ]
    if meta.stored_crops:
        lines.insert(-1, f"crops      {tuple(store.crops.shape)} uint8, the centre crops the teacher saw")
    per_source = Counter(manifest.column("source").to_pylist())
    for name, spec in meta.sources.items():
        lines.append(f"source     {name}: {spec['kind']} {spec['path']} ({per_source.get(name, 0)} images)")
    errors = manifest.filter(pc.equal(manifest.column("status"), "error")).column("error").to_pylist()
    for reason, count in Counter(e.split(":")[0] for e in errors).most_common(10):
        lines.append(f"errors     {count} x {reason}")
    return lines


def verify(store: FeatureStore, progress: bool = True) -> tuple[list[str], dict]:
    """Problems found (empty when whole) and counts. Checks that manifest and array agree: every ok
    row exactly once, inside its shard's rows and the array, with finite, written features."""
    problems: list[str] = []
    manifest = store.manifest()
    meta = store.meta
    table = manifest.to_pydict()
    rows, status = table["row"], table["status"]
    ok_rows = [r for r, s in zip(rows, status) if s == "ok"]
    counts = {"ok": len(ok_rows), "error": status.count("error"), "shards": len(set(table["shard"]))}

    for key, source, row, st, shard in zip(table["key"], table["source"], rows, status, table["shard"]):
        if st not in ("ok", "error"):
            problems.append(f"{source}/{key}: unknown status '{st}'")
        elif st == "ok" and row is None:
            problems.append(f"{source}/{key}: status ok without a row")
        elif st == "error" and row is not None:
            problems.append(f"{source}/{key}: status error with row {row}")
        elif row is not None and not shard * meta.shard_size <= row < (shard + 1) * meta.shard_size:
            problems.append(f"{source}/{key}: row {row} outside shard {shard}")
        elif row is not None and row >= store.features.shape[0]:
            problems.append(f"{source}/{key}: row {row} beyond the features array ({store.features.shape[0]} rows)")
        if source not in meta.sources:
            problems.append(f"{source}/{key}: source '{source}' is not registered in the store metadata")
    for row, times in Counter(ok_rows).items():
        if times > 1:
            problems.append(f"row {row} is claimed by {times} manifest rows")
    for (source, key), times in Counter(zip(table["source"], table["key"])).items():
        if times > 1:
            problems.append(f"{source}/{key} appears {times} times")
    if problems:
        return problems, counts

    features = store.features
    chunk = meta.chunk_size
    by_chunk: dict[int, list[int]] = {}
    for row in ok_rows:
        by_chunk.setdefault(row // chunk, []).append(row)
    for index in tqdm(sorted(by_chunk), desc="verify", unit="chunk", disable=not progress):
        start = index * chunk
        block = features[start : min(start + chunk, features.shape[0])]  # (c, V, D)
        local = np.array(by_chunk[index]) - start
        values = block[local]
        bad = ~np.isfinite(values).all(axis=(1, 2))
        empty = ~np.any(values, axis=(1, 2))
        problems += [f"row {start + i}: NaN or Inf in features" for i in local[bad]]
        problems += [f"row {start + i}: features never written (all zero)" for i in local[empty]]
    return problems, counts
