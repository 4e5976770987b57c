"""Repeated manifest entries, found from 16-byte digests: an image (source, key) or a features row that two
manifest rows claim.

The whole manifest's names never have to be held or hashed as strings: each part's (source, key) pairs become
a 64-bit polynomial hash (numpy over the Arrow string buffers, no Python object per row; 8 bytes per row), the
digests of all parts are sorted together, and only the rows whose digest repeats are compared by their names
(a digest collision costs a look, never a wrong answer).
"""

from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd
SEPARATOR = "\x00"  # between source and key in the hashed name; a name it confuses only costs a look


def name_digests(sources: pa.ChunkedArray | pa.Array, keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n,) uint64 digests of the names source + SEPARATOR + key."""
    return string_digests(pc.binary_join_element_wise(sources, keys, SEPARATOR))


def string_digests(strings: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n,) uint64: the sum over each string's bytes b_i (i from 0) of (b_i + 1) * m^(i + 1) mod 2^64, xor its
    length (a null counts as empty)."""
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    strings = pc.fill_null(strings, "").cast(pa.large_string())
    count = len(strings)
    offsets = np.frombuffer(strings.buffers()[1], np.int64)[strings.offset : strings.offset + count + 1]
    data = np.frombuffer(strings.buffers()[2] or b"", np.uint8)[offsets[0] : offsets[-1]]
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets)  # (n,)
    position = np.arange(len(data)) - np.repeat(offsets[:-1], lengths)  # (bytes,) index within its string
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(max(1, int(lengths.max(initial=0))), MULTIPLIER, np.uint64))  # m^1..m^L
        terms = (data + np.uint64(1)) * powers[position]  # (bytes,)
        running = np.concatenate([[np.uint64(0)], np.cumsum(terms, dtype=np.uint64)])
        return (running[offsets[1:]] - running[offsets[:-1]]) ^ lengths.astype(np.uint64)


def sharing_digests(digests: np.ndarray) -> np.ndarray:
    """Ascending indices of the rows of (N,) `digests` whose digest another row has too."""
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
