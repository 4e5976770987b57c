"""Repeated names and rows found from digests (pipeline.manifest): exact whatever the digests say."""

import numpy as np
import pyarrow as pa

from zeroseg.pipeline.manifest import SLICE_ROWS, name_digests, repeated_names, repeated_rows, sharing_digests


def test_equal_names_share_a_digest_and_distinct_ones_do_not():
    keys = [f"n{i // 7:08d}/img_{i}.JPEG" for i in range(SLICE_ROWS + 500)]  # more than one padded slice
    keys += ["", "café.jpg", "cafe\u0301.jpg", "a" * 300, "a" * 299, "b", "a\x00", "bad\\xff.jpg"]
    sources = ["imagenet"] * len(keys)
    keys.append(keys[3])  # the same key in another source: another image
    sources.append("cc12m")
    keys.append(keys[SLICE_ROWS + 100])  # a repeat, in another slice
    sources.append("imagenet")
    digests = name_digests(pa.chunked_array([sources[:10], sources[10:]]), pa.chunked_array([keys[:10], keys[10:]]))
    assert digests.shape == (len(keys),) and digests.dtype == np.uint64
    assert sharing_digests(digests).tolist() == [SLICE_ROWS + 100, len(keys) - 1]


def test_repeats_are_confirmed_by_name_so_a_digest_collision_reports_nothing():
    names = ["a/1", "b/2", "a/1", "c/3", "b/2", "a/1"]
    collide = np.zeros(len(names), np.uint64)  # every digest equal: each row is looked at by name
    assert repeated_names(collide, lambda indices: [names[i] for i in indices]) == {"a/1": 3, "b/2": 2}
    assert repeated_names(collide[:2], lambda indices: [names[i] for i in indices]) == {}
    assert repeated_names(np.arange(6, dtype=np.uint64), lambda indices: 1 / 0) == {}  # no repeat: no look


def test_repeated_rows_counts_each_row_claimed_more_than_once():
    assert repeated_rows(np.array([7, 3, 5, 3, 7, 3], np.int64)) == {3: 3, 7: 2}
    assert repeated_rows(np.arange(10, dtype=np.int64)) == {}
    assert repeated_rows(np.zeros(0, np.int64)) == {}
