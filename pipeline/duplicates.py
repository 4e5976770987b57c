"""Repeated manifest entries, found from 8-byte digests: an image (source, key) or a features row that two
manifest rows claim.

The whole manifest's names never have to be held or hashed as strings: each part's names become 64-bit
digests (Arrow pads each name with zero bytes to a whole number of 8-byte words, numpy mixes the words: no
Python object per row), the digests of all parts are sorted together, and only the rows whose digest
repeats are compared by their names (a digest collision costs a look, never a wrong answer).
"""

from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
