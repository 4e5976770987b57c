"""The manifest's rows: their Arrow schema, the `ImageRecord` each row is, and the check that no image or
features row is claimed twice.

Repeated entries are found from 8-byte digests: the whole manifest's names never have to be held or hashed as
strings: each part's names become 64-bit digests (Arrow pads each name with zero bytes to a whole number of
8-byte words, numpy mixes the words: no Python object per row), the digests of all parts are sorted together,
and only the rows whose digest repeats are compared by their names (a digest collision costs a look, never a
wrong answer).
"""

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from zeroseg.errors import UserError

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


NAME_DIGEST = "name_digest"  # a column a reader may hold instead of source and key: their `name_digests`


def refuse_duplicates(
    path: Path, table: pa.Table, names_of_rows: Callable[[np.ndarray], list[str]] | None = None
) -> None:
    """UserError when two manifest rows hold the same image (source, key) or the same features row (found from
    digests: `name_digests`). A table that holds the names' digests (NAME_DIGEST) with the rows instead of
    the names is checked too: names_of_rows(rows) gives the names 'source/key' of the images of features rows
    `rows`, for the few rows whose digest repeats."""
    names = set(table.column_names)
    if {"source", "key"} <= names:
        refuse_repeated_names(path, name_digests(table["source"], table["key"]), partial(name_list, table))
    if "row" in names:
        repeated = repeated_rows(table["row"].drop_null().to_numpy())
        if repeated:
            raise UserError(
                f"store '{path}': features row {next(iter(repeated))} is claimed by several manifest rows: "
                f"run zs-cache verify"
            )
    if NAME_DIGEST in names:  # after the rows' check: the names are looked up by row
        rows = table["row"].to_numpy()
        refuse_repeated_names(path, table[NAME_DIGEST].to_numpy(), lambda indices: names_of_rows(rows[indices]))


def refuse_repeated_names(path: Path, digests: np.ndarray, names_of: Callable[[np.ndarray], list[str]]) -> None:
    """UserError naming an image that several of the rows whose names have (N,) `digests` hold."""
    repeated = repeated_names(digests, names_of)
    if repeated:
        name, count = next(iter(repeated.items()))
        raise UserError(
            f"store '{path}': image {name} appears {count} times in the manifest ({len(repeated)} duplicated "
            f"images): run zs-cache verify"
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


# --- repeated entries, from digests -----------------------------------------------------------------------

MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
SLICE_ROWS = 8192  # names padded at once: a few long names cost at most SLICE_ROWS times their length


def name_digests(sources: pa.ChunkedArray | pa.Array, keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n,) uint64 digests of the names (source, key), batch by batch: the names are never copied into one array."""
    batches = pa.table({"source": sources, "key": keys}).to_batches()  # zero-copy slices, aligned
    pieces = [_batch_digests(batch["source"], batch["key"]) for batch in batches]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.uint64)


def _batch_digests(sources: pa.Array, keys: pa.Array) -> np.ndarray:
    sources = pc.dictionary_encode(sources)
    per_source = string_digests(sources.dictionary)  # (distinct sources,)
    with np.errstate(over="ignore"):
        salt = per_source[sources.indices.to_numpy(zero_copy_only=False)] * MULTIPLIER
        return mix(string_digests(keys) ^ salt)


def string_digests(strings: pa.Array) -> np.ndarray:
    """(n,) uint64: each string's length, then its bytes padded with zero bytes to whole 8-byte words, mixed in
    word by word (a null counts as empty)."""
    strings = pc.fill_null(strings, "").cast(pa.binary())
    digests = np.empty(len(strings), np.uint64)
    for start in range(0, len(strings), SLICE_ROWS):
        names = strings.slice(start, SLICE_ROWS)
        lengths = pc.binary_length(names)
        width = 8 * max(1, -(-(pc.max(lengths).as_py() or 0) // 8))
        padding = pc.binary_repeat(pa.scalar(b"\0"), pc.subtract(width, lengths))
        padded = pc.binary_join_element_wise(names, padding, b"").cast(pa.binary(width))
        words = np.frombuffer(padded.buffers()[1], np.uint64)[: len(names) * width // 8].reshape(len(names), -1)
        digest = mix(lengths.to_numpy(zero_copy_only=False).astype(np.uint64))
        for column in range(words.shape[1]):
            digest = mix(digest ^ words[:, column])
        digests[start : start + len(names)] = digest
    return digests


def mix(values: np.ndarray) -> np.ndarray:
    """A multiply-xorshift round over uint64 values (wrapping)."""
    with np.errstate(over="ignore"):
        values = values * MULTIPLIER
        return values ^ (values >> np.uint64(29))


def sharing_digests(digests: np.ndarray) -> np.ndarray:
    """Ascending indices of the rows of (N,) `digests` whose digest another row has too."""
    ordered = np.sort(digests)  # (N,): a copy of 8 bytes per row finds that no digest repeats (the usual case)
    if not np.any(ordered[1:] == ordered[:-1]):
        return np.zeros(0, np.int64)
    order = np.argsort(digests)  # (N,)
    ordered = digests[order]
    same = ordered[1:] == ordered[:-1]  # (N - 1,) row equals the one before it
    shared = np.zeros(len(order), dtype=bool)
    shared[1:] |= same
    shared[:-1] |= same
    return np.sort(order[shared])


def repeated_names(digests: np.ndarray, names_of: Callable[[np.ndarray], list[str]]) -> dict[str, int]:
    """{name: count} of the names that several rows of (N,) `digests` hold, in the order they first appear;
    names_of(indices) gives the names 'source/key' of rows `indices` (only rows whose digest repeats)."""
    candidates = sharing_digests(digests)
    if not len(candidates):
        return {}
    counts = Counter(names_of(candidates))
    return {name: count for name, count in counts.items() if count > 1}


def repeated_rows(rows: np.ndarray) -> dict[int, int]:
    """{row: count} of the features rows that several manifest rows claim, in row order."""
    ordered = np.sort(rows)
    same = ordered[1:] == ordered[:-1]
    if not same.any():
        return {}
    values, counts = np.unique(ordered[1:][same], return_counts=True)
    return {int(value): int(count) + 1 for value, count in zip(values, counts)}
