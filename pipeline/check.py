"""`zs-cache inspect` and `zs-cache verify`: what a store holds, and whether it is whole."""

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from zeroseg.pipeline.sizes import human_size
from zeroseg.pipeline.store import FeatureStore


def disk_size(path: Path) -> int:
    """Bytes of the files under `path` (os.scandir: a store has a file per chunk, often millions)."""
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                total += disk_size(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def describe(store: FeatureStore) -> list[str]:
    """Human-readable lines: counts, teacher, grids, size on disk, error summary."""
    meta = store.meta
    manifest = store.manifest(columns=["status", "error", "source", "shard"])
    status = value_counts(manifest["status"])
    teacher = meta.teacher
    weights = f" sha256={teacher['weights_sha256']}" if teacher["weights_sha256"] else ""
    lines = [
        f"store      {store.path}",
        f"images     {status.get('ok', 0)} ok, {status.get('error', 0)} errors, "
        f"{len(pc.unique(manifest['shard']))} shards (shard size {meta.shard_size})",
        f"teacher    {teacher['model']} pretrained={teacher['pretrained'] or 'none (random weights)'} "
        f"quick_gelu={teacher['quick_gelu']}{weights}",
        f"views      grids {','.join(map(str, meta.grids))} -> {meta.num_views} views of "
        f"{meta.preprocessing['view_size']}px from {meta.preprocessing['crop_size']}px centre crops",
        f"features   {tuple(store.features.shape)} float16, dim {meta.embed_dim}, chunks of {meta.chunk_size} images",
        f"disk       {human_size(disk_size(store.path))}",
    ]
    if meta.stored_crops:
        lines.insert(-1, f"crops      {tuple(store.crops.shape)} uint8, the centre crops the teacher saw")
    per_source = value_counts(manifest["source"])
    for name, spec in meta.sources.items():
        lines.append(f"source     {name}: {spec['kind']} {spec['path']} ({per_source.get(name, 0)} images)")
    errors = manifest.filter(pc.equal(manifest.column("status"), "error")).column("error").to_pylist()
    for reason, count in Counter(e.split(":")[0] for e in errors).most_common(10):
        lines.append(f"errors     {count} x {reason}")
    return lines


def value_counts(column) -> dict:
    """{value: count} of a manifest column, counted in Arrow."""
    return {item["values"]: item["counts"] for item in pc.value_counts(column).to_pylist()}


def verify(store: FeatureStore, progress: bool = True) -> tuple[list[str], dict]:
    """Problems found (empty when whole) and counts. Checks that manifest and array agree: every ok
    row exactly once, inside its shard's rows and the array, with finite, written features.

    Column-wise: the manifest's checks are array operations, and the features are read a block of
    whole chunks at a time (at most VERIFY_BLOCK_BYTES decompressed), so time and memory stay near
    one pass over the store whatever the number of rows."""
    meta = store.meta
    manifest = store.manifest(["row", "key", "source", "status", "shard"])
    status = manifest["status"]
    has_row = manifest["row"].is_valid().to_numpy(zero_copy_only=False)  # (N,) bool
    rows = manifest["row"].fill_null(-1).to_numpy()  # (N,) int64
    shard = manifest["shard"].to_numpy().astype(np.int64)
    is_ok = pc.fill_null(pc.equal(status, "ok"), False).to_numpy(zero_copy_only=False)
    is_error = pc.fill_null(pc.equal(status, "error"), False).to_numpy(zero_copy_only=False)
    ok_rows = np.sort(rows[is_ok & has_row])
    counts = {"ok": int(is_ok.sum()), "error": int(is_error.sum()), "shards": len(np.unique(shard))}

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
    found: list[tuple[int, str]] = []  # (manifest index, message), reported in manifest order
    for failing, message in row_checks:
        for i in np.flatnonzero(failing & ~reported):
            found.append((int(i), message(int(i))))
        reported |= failing
    unregistered = pc.invert(pc.is_in(manifest["source"], pa.array(list(meta.sources), pa.string())))
    found += [(int(i), f"source '{manifest['source'][int(i)].as_py()}' is not registered in the store metadata")
              for i in np.flatnonzero(unregistered.to_numpy(zero_copy_only=False))]  # fmt: skip
    problems = [f"{manifest['source'][i].as_py()}/{manifest['key'][i].as_py()}: {text}" for i, text in sorted(found)]
    repeated_rows, times = np.unique(ok_rows, return_counts=True)
    problems += [f"row {row} is claimed by {n} manifest rows" for row, n in zip(repeated_rows, times) if n > 1]
    names = pc.binary_join_element_wise(manifest["source"], manifest["key"], "/")
    repeats = pc.value_counts(names)
    repeats = repeats.filter(pc.greater(repeats.field("counts"), 1))
    problems += [f"{r['values']} appears {r['counts']} times" for r in repeats.to_pylist()]
    if problems:
        return problems, counts
    return _feature_problems(store, ok_rows, progress), counts


VERIFY_BLOCK_BYTES = 64 * 2**20


def _feature_problems(store: FeatureStore, ok_rows: np.ndarray, progress: bool) -> list[str]:
    """Rows among the sorted `ok_rows` whose features hold NaN/Inf or were never written."""
    features, chunk = store.features, store.meta.chunk_size
    row_bytes = int(np.prod(features.shape[1:])) * features.dtype.itemsize
    block = chunk * max(1, VERIFY_BLOCK_BYTES // (row_bytes * chunk))  # rows per read, whole chunks
    problems: list[str] = []
    starts = np.unique(ok_rows // block) * block
    for start in tqdm(starts, desc="verify", unit="block", disable=not progress):
        lo, hi = np.searchsorted(ok_rows, [start, start + block])
        wanted = ok_rows[lo:hi]
        values = features[int(start) : int(wanted[-1]) + 1][wanted - start]  # (n, V, D)
        bad = ~np.isfinite(values).all(axis=(1, 2))
        empty = ~np.any(values, axis=(1, 2))
        problems += [f"row {row}: NaN or Inf in features" for row in wanted[bad]]
        problems += [f"row {row}: features never written (all zero)" for row in wanted[empty]]
    return problems
