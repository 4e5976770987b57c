"""Two writers at the same instant: real processes released together, the loser refused in one line, the store
whole."""

import subprocess
import sys
import time

from tests.conftest import TINY_TEACHER, run_cli
from zeroseg.pipeline.store import FeatureStore

AT_THE_START_SIGNAL = """
import os, sys, time
import open_clip, torch  # imported before the start, so that both race for the store itself
import zeroseg.pipeline.build
from zeroseg.pipeline.cli import main

start = sys.argv.pop(1)
open(start + "." + str(os.getpid()), "w").close()  # ready
while not os.path.exists(start):
    time.sleep(0.001)
sys.argv[0] = "zs-cache"
main()
"""


def test_two_builds_started_at_the_same_instant_one_refused_and_the_store_whole(photos, tmp_path):
    store, start = tmp_path / "store", tmp_path / "start"
    args = ["build", photos, "--store", store, "--teacher", TINY_TEACHER, "--pretrained", "none", "--device", "cpu",
            "--image-size", "32", "--shard-size", "4", "--chunk-size", "2", "--no-progress", "--decode-threads", "1"]
    builds = [subprocess.Popen([sys.executable, "-c", AT_THE_START_SIGNAL, str(start), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    while len(list(tmp_path.glob("start.*"))) < 2 and all(build.poll() is None for build in builds):
        time.sleep(0.01)
    start.touch()
    outputs = [build.communicate(timeout=300) for build in builds]
    codes = [build.returncode for build in builds]
    assert sorted(codes) == [0, 2], outputs
    refused = outputs[codes.index(2)][1]
    assert refused == (f"error: store '{store}' is being written by another zs-cache build or compact; wait for it "
                       f"to finish\n")
    assert run_cli("zeroseg.pipeline.cli", "verify", store).returncode == 0
    keys = FeatureStore.open(store).manifest(["key"])["key"].to_pylist()
    assert sorted(keys) == sorted(str(path.relative_to(photos)) for path in photos.rglob("*.jpg"))


KILLED_WRITING_A_PART = """
import os, signal, sys
import pyarrow.parquet as pq
from zeroseg.pipeline.compact import compact
from zeroseg.pipeline.options import CompactOptions

written = pq.write_table
def half_written_then_killed(table, where, **kwargs):  # SIGKILL in the middle of writing the merged part
    written(table, where, **kwargs)
    os.truncate(where, os.path.getsize(where) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
pq.write_table = half_written_then_killed
compact(CompactOptions(sys.argv[1], 100))
"""


def test_a_compact_killed_while_it_writes_a_part_leaves_a_store_that_reads_verifies_and_compacts(crops_store):
    manifest = FeatureStore.open(crops_store).manifest().sort_by("key")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITING_A_PART, str(crops_store)], capture_output=True)
    assert killed.returncode == -9, killed.stderr
    (partial,) = (crops_store / "manifest").glob(".shards-*.partial")
    assert FeatureStore.open(crops_store).manifest().sort_by("key").equals(manifest)
    assert run_cli("zeroseg.pipeline.cli", "verify", crops_store).returncode == 0
    compacted = run_cli("zeroseg.pipeline.cli", "compact", crops_store)
    assert compacted.returncode == 0, compacted.stderr
    assert sorted(path.name for path in (crops_store / "manifest").iterdir()) == ["shards-000000-000002.parquet"]
    assert FeatureStore.open(crops_store).manifest().sort_by("key").equals(manifest)
