"""zs-cache compact: fewer, larger manifest parts that every reader reads as before, repairable shard by shard,
and safe to kill at any of its changes to the store."""

import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import PHOTOS, TINY_TEACHER, flip_byte, invoke, read_every_batch, rebuild
from zeroseg.errors import UserError
from zeroseg.pipeline.build import BuildOptions, run_build
from zeroseg.pipeline.check import find_damage
from zeroseg.pipeline.cli import main as zs_cache
from zeroseg.pipeline.compact import compact
from zeroseg.pipeline.options import CompactOptions
from zeroseg.pipeline.store import FeatureStore, builder_lock

CRASH = Path(__file__).parent / "compact_crash.py"


@pytest.fixture
def store(crops_store):
    return crops_store


def part_names(store) -> list[str]:
    return sorted(path.name for path in (store / "manifest").iterdir())


def manifest_by_key(store):
    return FeatureStore.open(store).manifest().sort_by("key")


def assert_batches_equal(ours, theirs):
    assert len(ours) == len(theirs)
    for one, other in zip(ours, theirs):
        for name in ("crops", "features", "rows"):
            assert getattr(one, name).equal(getattr(other, name)), name


def test_a_compacted_store_reads_verifies_trains_and_reruns_as_before(store):
    manifest, batches = manifest_by_key(store), read_every_batch(store)
    compacted = invoke(zs_cache, "compact", store)
    assert compacted.returncode == 0, compacted.stderr
    assert compacted.stdout.strip() == f"compacted store {store}: 3 manifest parts -> 1 (10 rows)"
    assert part_names(store) == ["shards-000000-000002.parquet"]
    part = pq.ParquetFile(store / "manifest" / "shards-000000-000002.parquet")
    assert b"zeroseg.shards" in part.metadata.metadata and b"zeroseg.chunks" not in part.metadata.metadata

    assert manifest_by_key(store).equals(manifest)
    assert_batches_equal(read_every_batch(store), batches)
    verified = invoke(zs_cache, "verify", store, "--no-progress")
    assert verified.returncode == 0 and "verified: 10 ok rows, 0 errors, 3 shards" in verified.stdout
    shown = invoke(zs_cache, "inspect", store)
    assert "a commit record for each of the 3 shards" in shown.stdout and "10 ok, 0 errors, 3 shards" in shown.stdout
    assert pq.read_table(store / "manifest").num_rows == 10  # the README's plain readers
    assert duckdb.sql(f"SELECT count(*) FROM '{store}/manifest/*.parquet'").fetchall() == [(10,)]

    summary, _ = rebuild(store)
    assert summary.processed == 0 and part_names(store) == ["shards-000000-000002.parquet"]
    again = invoke(zs_cache, "compact", store)
    assert again.stdout.strip() == f"nothing to compact: store {store} has 1 manifest part"


def test_parts_merge_in_shard_order_up_to_the_rows_per_part_and_new_shards_join_later(store, tmp_path):
    assert compact(CompactOptions(store, 8)).parts_after == 2  # shards 0 and 1 (8 rows); shard 2 alone stays
    assert part_names(store) == ["shard-000002.parquet", "shards-000000-000001.parquet"]
    (tmp_path / "more").mkdir()
    shutil.copy(PHOTOS[0], tmp_path / "more" / "again.jpg")
    opts = BuildOptions(source=str(tmp_path / "more"), store=str(store), teacher=str(TINY_TEACHER), pretrained="none",
                        device="cpu", image_size=32, progress=False)  # fmt: skip
    summary = run_build(opts, log=lambda line: None)  # a second source: shard 3, a single part
    assert (summary.processed, summary.shards) == (1, 1)
    assert "shard-000003.parquet" in part_names(store)
    assert compact(CompactOptions(store)).parts_after == 1
    assert part_names(store) == ["shards-000000-000003.parquet"]
    assert FeatureStore.open(store).committed_shards() == {0, 1, 2, 3}
    assert not find_damage(FeatureStore.open(store), progress=False).problems


def test_repair_redoes_one_shard_of_a_compacted_part_and_leaves_the_others(store):
    before = FeatureStore.open(store).features[:]
    compact(CompactOptions(store))
    flip_byte(store / "features" / "c" / "3" / "0" / "0")  # rows 6-7: shard 1
    verified = invoke(zs_cache, "verify", store, "--no-progress")
    assert verified.returncode == 1
    assert "shard 1: chunk features/c/3/0/0 is damaged (crc32c differs from its commit record)" in verified.stderr
    summary, lines = rebuild(store, repair=True)
    assert lines[0].startswith("repair: shard 1 is damaged") and (summary.processed, summary.shards) == (4, 1)
    assert part_names(store) == ["shard-000001.parquet", "shards-000000-000002.parquet"]
    fs = FeatureStore.open(store)
    assert list(fs.part_records(store / "manifest" / "shards-000000-000002.parquet")) == [0, 2]
    assert fs.committed_shards() == {0, 1, 2}
    assert invoke(zs_cache, "verify", store, "--no-progress").returncode == 0
    np.testing.assert_array_equal(fs.features[:], before)
    assert compact(CompactOptions(store)).parts_after == 1 and part_names(store) == ["shards-000000-000002.parquet"]


@pytest.mark.parametrize("damage", ["data page", "footer"])
def test_a_compacted_part_that_no_longer_reads_is_redone_whole(store, damage):
    compact(CompactOptions(store, 8))  # shards 0-1 compacted, shard 2 a single part
    part = store / "manifest" / "shards-000000-000001.parquet"
    if damage == "data page":
        flip_byte(part, position=20)  # its page checksum fails
    else:
        part.write_bytes(part.read_bytes()[:-12])  # no footer: not even its shards can be read
    with pytest.raises(UserError, match="shards-000000-000001.parquet' is damaged"):
        FeatureStore.open(store).manifest()
    found = find_damage(FeatureStore.open(store), progress=False)
    assert sorted(found.shards) == [0, 1] and not found.unrepairable
    summary, lines = rebuild(store, repair=True)
    assert (summary.processed, summary.shards) == (8, 2)
    assert part_names(store) == ["shard-000000.parquet", "shard-000001.parquet", "shard-000002.parquet"]
    assert invoke(zs_cache, "verify", store, "--no-progress").returncode == 0


def test_compact_is_refused_while_a_builder_holds_the_store_and_on_a_folder_that_is_no_store(store, tmp_path):
    with builder_lock(store):
        refused = invoke(zs_cache, "compact", store)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: store '{store}' is being written by another zs-cache build or compact; wait for it to finish"
    )
    assert len(part_names(store)) == 3
    flip_byte(store / "manifest" / "shard-000001.parquet", position=20)
    damaged = invoke(zs_cache, "compact", store)
    assert damaged.returncode == 2 and len(damaged.stderr.strip().splitlines()) == 1
    assert damaged.stderr.startswith(f"error: manifest part '{store / 'manifest' / 'shard-000001.parquet'}' is damaged")
    assert damaged.stderr.strip().endswith("run zs-cache build --repair") and len(part_names(store)) == 3
    missing = invoke(zs_cache, "compact", tmp_path / "nothing")
    assert missing.returncode == 2 and "is not a feature store" in missing.stderr
    assert not (tmp_path / "nothing").exists()


def test_a_part_without_its_commit_record_is_damaged_and_compact_refuses_it(store):
    """One store format: every part carries a commit record; a part without one is damage, not an older part."""
    part = store / "manifest" / "shard-000001.parquet"
    pq.write_table(pq.read_table(part).replace_schema_metadata(None), part)
    line = f"manifest part '{part}' is damaged (it lacks the chunk record of a part)"
    refused = invoke(zs_cache, "compact", store)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [f"error: {line}"]
    assert len(part_names(store)) == 3
    verified = invoke(zs_cache, "verify", store, "--no-progress")
    assert verified.returncode == 1 and f"problem: {line}" in verified.stderr


@pytest.mark.parametrize(("given", "told"), [
    ("0", "error: --rows-per-part must be a positive number of rows, got 0"),
    ("-3", "error: --rows-per-part must be a positive number of rows, got -3"),
    ("many", "Invalid value for '--rows-per-part': Input should be a valid integer"),
])  # fmt: skip
def test_rows_per_part_is_refused_in_one_line_unless_a_positive_integer(store, given, told):
    refused = invoke(zs_cache, "compact", store, "--rows-per-part", given)
    assert refused.returncode == 2 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--rows-per-part" in lines[0] and told in lines[0], refused.stderr
    assert len(part_names(store)) == 3


def run_crashing(store, kill_at: int, *steps: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CRASH), str(store), str(kill_at), *map(str, steps)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_a_compact_killed_at_any_change_leaves_a_store_that_reads_verifies_resumes_and_compacts(store, tmp_path):
    """Two compacts (3 single parts -> shards 0-1 + shard 2 -> one part) killed before each of their file changes
    in turn: every state reads the same manifest, verifies, reruns as a no-op, and a compact then finishes."""
    manifest, batches = manifest_by_key(store), read_every_batch(store)
    steps = (8, 100)
    finished = tmp_path / "finished"
    shutil.copytree(store.parent, finished)
    whole = run_crashing(finished / "store", 0, *steps)
    assert whole.returncode == 0, whole.stderr
    changes = int(whole.stdout)
    assert changes == 6  # per compact: a rename, then the merged parts' removals
    leftovers = []
    for kill_at in range(1, changes + 1):
        copy = tmp_path / f"kill-{kill_at}"
        shutil.copytree(store.parent, copy)
        crashed = run_crashing(copy / "store", kill_at, *steps)
        assert crashed.returncode == -9, crashed.stderr
        assert manifest_by_key(copy / "store").equals(manifest), kill_at
        damage = find_damage(FeatureStore.open(copy / "store"), progress=False)
        assert not damage.problems, (kill_at, damage.problems)
        leftovers.append(damage.counts.get("leftover_parts", 0))
        assert rebuild(copy / "store")[0].processed == 0
        compact(CompactOptions(copy / "store"))
        assert part_names(copy / "store") == ["shards-000000-000002.parquet"], kill_at
        assert manifest_by_key(copy / "store").equals(manifest)
        if kill_at == changes:
            assert_batches_equal(read_every_batch(copy / "store"), batches)
    assert leftovers == [0, 2, 1, 0, 2, 1]  # killed before each rename: none; before each removal: some
