"""zs-cache build on Dask: a real LocalCluster of 2 worker processes on the CPU, the tiny teacher, real stores."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import dask
import numpy as np
import psutil
import pytest
import torch
from distributed import Client, LocalCluster
from tqdm import tqdm

from tests.conftest import PHOTOS, TINY_TEACHER, Terminal, final_bar_line, invoke, run_cli
from zeroseg.errors import UserError
from zeroseg.pipeline.build import run_build
from zeroseg.pipeline.cli import main as zs_cache
from zeroseg.pipeline.crops import crop_from_bytes
from zeroseg.pipeline.dask_build import (
    ClusterProgress,
    ShardJob,
    TeacherSpec,
    WorkerUserError,
    encode_shard_on_worker,
    require_visible,
    scheduler_address,
    worker_counts,
)
from zeroseg.pipeline.manifest import image_records
from zeroseg.pipeline.options import BuildOptions
from zeroseg.pipeline.shards import EncodeSettings, Shard
from zeroseg.pipeline.sources import TAR_INDEX_DIR, open_source, tar_members
from zeroseg.pipeline.store import FeatureStore
from zeroseg.pipeline.store_reader import SourceImages, StoreReader
from zeroseg.pipeline.teacher import Teacher, resolve_identity

TINY = dict(teacher=str(TINY_TEACHER), pretrained="none", device="cpu", shard_size=4, chunk_size=2,
            batch_size=3, image_size=64, progress=False)
MANIFEST_COLUMNS = ["key", "row", "status", "shard", "sha256", "width", "height"]


@pytest.fixture(scope="module")
def cluster():
    """An existing Dask cluster (what --scheduler connects to): 2 worker processes, one thread each."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local:
        with Client(local) as client:
            yield client


def build(source, store, **overrides):
    return run_build(BuildOptions(source=str(source), store=str(store), **{**TINY, **overrides}), log=lambda s: None)


def copies(photos, times):
    """The fixture photos `times` over in subfolders (more shards for the cluster to spread)."""
    originals = sorted(photos.rglob("*.jpg"))
    for i in range(times):
        for path in originals:
            target = photos / f"copy{i}" / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return photos


def write_tar_shards(root, sizes=(6, 4)):
    """img2dataset's webdataset output: 00000.tar, 00001.tar, ... with {key}.jpg/.json/.txt per sample."""
    root.mkdir()
    photos, expected = iter(PHOTOS), {}
    for shard, size in enumerate(sizes):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as archive:
            for index in range(size):
                photo, key = next(photos), f"{shard:05d}{index:04d}"
                meta = json.dumps({"key": key, "url": f"http://example.com/{photo.name}", "status": "success"})
                for extension, data in (("jpg", photo.read_bytes()), ("json", meta.encode()), ("txt", b"a photo")):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
                expected[f"{shard:05d}.tar/{key}"] = photo
        (root / f"{shard:05d}_stats.json").write_text("{}")
    return expected


def test_two_workers_match_single_process(cluster, photos, tmp_path):
    single = build(photos, tmp_path / "one")
    spread = build(photos, tmp_path / "two", scheduler=cluster.scheduler.address)
    assert (spread.processed, spread.ok, spread.shards) == (single.processed, single.ok, single.shards) == (10, 10, 3)
    one, two = FeatureStore.open(tmp_path / "one"), FeatureStore.open(tmp_path / "two")
    assert two.manifest(MANIFEST_COLUMNS).sort_by("key").equals(one.manifest(MANIFEST_COLUMNS).sort_by("key"))
    assert two.features.shape == one.features.shape and two.committed_shards() == {0, 1, 2}
    np.testing.assert_allclose(two.features[:].astype(np.float32), one.features[:].astype(np.float32), atol=2e-3)
    assert two.meta.teacher == one.meta.teacher and two.meta.preprocessing == one.meta.preprocessing
    assert invoke(zs_cache, "verify", tmp_path / "two", "--no-progress").returncode == 0
    assert build(photos, tmp_path / "two", scheduler=cluster.scheduler.address).processed == 0


def test_the_cluster_bar_reaches_the_total_from_the_workers_running_counts(cluster, photos, tmp_path, monkeypatch):
    topics = set(cluster.get_events())
    monkeypatch.setattr(sys, "stderr", Terminal())
    build(photos, tmp_path / "store", scheduler=cluster.scheduler.address, progress=True)
    assert final_bar_line(sys.stderr.getvalue()).startswith("zs-cache: 100%") and " 10/10 " in sys.stderr.getvalue()
    (topic,) = {t for t in set(cluster.get_events()) - topics if t.startswith("zs-cache-progress-")}  # this build's
    events = cluster.get_events(topic)
    counts = {}
    for _, (shard, count) in events:
        assert count > counts.get(shard, 0)  # a running count of the shard's images
        counts[shard] = count
    assert counts == {0: 4, 1: 4, 2: 2}  # each shard's last report is its end
    replayed = ClusterProgress(tqdm(total=10, disable=False, file=io.StringIO()))
    for event in events:
        replayed.on_event(event)
    assert replayed.bar.n == 10  # the events alone bring the bar to the total, without the commits


def test_scheduler_file_names_the_cluster(cluster, photos, tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    # What `dask scheduler --scheduler-file` writes at start (Client.write_scheduler_file would also dump the
    # workers' metrics, whose tuple keys JSON refuses once the module's cluster has run tasks).
    scheduler_file.write_text(json.dumps({"type": "Scheduler", "address": cluster.scheduler.address, "workers": {}}))
    summary = build(photos, tmp_path / "store", scheduler_file=str(scheduler_file))
    assert (summary.processed, summary.ok, summary.shards) == (10, 10, 3)
    with pytest.raises(UserError, match="no Dask scheduler wrote '.*absent.json' within 0 s"):
        scheduler_address(str(tmp_path / "absent.json"), timeout_s=0)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json' is not a Dask scheduler file"):
        scheduler_address(str(tmp_path / "broken.json"), timeout_s=0)
    common = ["--store", tmp_path / "other", "--teacher", TINY_TEACHER, "--pretrained", "none", "--no-progress"]
    both = invoke(zs_cache, "build", photos, *common, "--scheduler-file", scheduler_file, "--workers", "2")
    assert both.returncode == 2 and "--scheduler-file names the cluster to build on" in both.stderr


def test_teacher_is_built_once_per_worker(cluster, photos, tmp_path):
    before = cluster.run(worker_counts)
    summary = build(copies(photos, 2), tmp_path / "store", shard_size=2, scheduler=cluster.scheduler.address)
    assert summary.shards == 15
    after = cluster.run(worker_counts)
    encoded = {w: after[w].get("shards_encoded", 0) - before[w].get("shards_encoded", 0) for w in after}
    assert sum(encoded.values()) == 15 and all(n > 0 for n in encoded.values()), encoded
    assert [counts["teachers_built"] for counts in after.values()] == [1, 1]


def test_stored_crops_are_the_decoded_crops(cluster, photos, tmp_path):
    build(photos, tmp_path / "store", store_crops=True, scheduler=cluster.scheduler.address)
    build(photos, tmp_path / "here", store_crops=True)
    store = FeatureStore.open(tmp_path / "store")
    np.testing.assert_array_equal(FeatureStore.open(tmp_path / "here").crops[:], store.crops[:])
    assert store.meta.stored_crops and store.crops.dtype == np.uint8
    assert store.crops.shape == (10, 64, 64, 3) and store.crops.chunks == (2, 64, 64, 3)
    records = image_records(store.manifest())
    decoded = SourceImages(store.meta).crops(records)
    stored = StoreReader.open(store.path)
    rows = np.array([r.row for r in records])
    assert stored.reads_stored_crops
    np.testing.assert_array_equal(stored.stored_crops(rows), decoded)
    np.testing.assert_array_equal(stored.stored_crops(rows[::-1]), decoded[::-1])
    np.testing.assert_array_equal(store.crops[:][[r.row for r in records]], decoded)
    teacher = Teacher(store.meta.teacher, torch.device("cpu"))
    again = teacher.encode_crops(torch.from_numpy(stored.stored_crops(rows[:4])), store.meta.grids).float()
    expected = torch.from_numpy(store.features[:][[r.row for r in records[:4]]]).float()
    torch.testing.assert_close(again, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("decode", ["reduced", "device"])
def test_workers_decode_as_the_store_says(cluster, photos, tmp_path, decode):
    build(photos, tmp_path / "store", store_crops=True, decode=decode, scheduler=cluster.scheduler.address)
    build(photos, tmp_path / "here", store_crops=True, decode=decode)
    store, here = FeatureStore.open(tmp_path / "store"), FeatureStore.open(tmp_path / "here")
    assert store.meta.preprocessing.decode == decode
    assert store.meta.preprocessing.decode_device == ("cpu" if decode == "device" else None)
    np.testing.assert_array_equal(store.crops[:], here.crops[:])
    np.testing.assert_array_equal(store.features[:], here.features[:])
    records = image_records(store.manifest())
    full = np.stack([crop_from_bytes((photos / r.key).read_bytes(), 64)[0] for r in records])
    assert np.abs(store.crops[:][[r.row for r in records]].astype(int) - full).max() > 0  # not the full decode


def test_tar_shards_alone_and_combined_with_a_folder(cluster, photos, tmp_path):
    expected = write_tar_shards(tmp_path / "cc")
    summary = build(tmp_path / "cc", tmp_path / "store", scheduler=cluster.scheduler.address)
    assert (summary.ok, summary.shards) == (10, 3)
    store = FeatureStore.open(tmp_path / "store")
    assert store.meta.stored_crops and store.meta.sources["cc"].kind == "tar"
    records = store.manifest().to_pylist()
    assert {r["key"] for r in records} == set(expected)
    assert all(len({r["key"].split("/")[0] for r in records if r["shard"] == s}) == 1 for s in (0, 1, 2))
    for record in records:
        photo = expected[record["key"]].read_bytes()
        assert record["sha256"] == hashlib.sha256(photo).hexdigest()
        np.testing.assert_array_equal(store.crops[record["row"]], crop_from_bytes(photo, 64)[0])
    build(photos, tmp_path / "store", scheduler=cluster.scheduler.address)
    store = FeatureStore.open(tmp_path / "store")
    records = image_records(store.manifest())
    assert len(records) == 20 and set(store.meta.sources) == {"cc", "photos"}
    decoded = SourceImages(store.meta).crops(records)
    stored = StoreReader.open(store.path).stored_crops(np.array([r.row for r in records]))
    np.testing.assert_array_equal(stored, decoded)
    assert invoke(zs_cache, "verify", tmp_path / "store", "--no-progress").returncode == 0


def test_each_tar_is_scanned_once_and_its_index_reused_until_the_tar_changes(tmp_path):
    expected = write_tar_shards(tmp_path / "cc")
    tar = tmp_path / "cc" / "00000.tar"
    tar_members.cache_clear()
    assert open_source(tmp_path / "cc").keys() == list(expected)
    index = tmp_path / "cc" / TAR_INDEX_DIR / "00000.tar.json"
    saved = json.loads(index.read_text())
    assert (saved["size"], saved["mtime_ns"], len(saved["members"])) == (tar.stat().st_size, tar.stat().st_mtime_ns, 6)
    saved["members"] = saved["members"][:2]  # a doctored index: a listing that shows it read the index, not the tar
    index.write_text(json.dumps(saved))
    tar_members.cache_clear()
    assert len(open_source(tmp_path / "cc").keys()) == 2 + 4
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 1000))  # the tar changed: scanned again
    tar_members.cache_clear()
    assert open_source(tmp_path / "cc").keys() == list(expected)
    index.write_text("{damaged")  # an unreadable index is rebuilt from the tar
    tar_members.cache_clear()
    assert open_source(tmp_path / "cc").keys() == list(expected) and len(json.loads(index.read_text())["members"]) == 6
    tar_members.cache_clear()


def test_crops_need_a_store_made_with_them(photos, tmp_path):
    write_tar_shards(tmp_path / "cc")
    build(photos, tmp_path / "store")
    common = ["--store", tmp_path / "store", "--teacher", TINY_TEACHER, "--pretrained", "none", "--device", "cpu",
              "--image-size", "64", "--no-progress"]
    asked = invoke(zs_cache, "build", photos, *common, "--store-crops")
    tars = invoke(zs_cache, "build", tmp_path / "cc", *common)
    for result, message in ((asked, "was made without --store-crops and cannot take crops"),
                            (tars, "holds tar shards, which the trainer reads only through stored crops")):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not FeatureStore.open(tmp_path / "store").meta.stored_crops


def test_worker_killed_mid_build_still_finishes(tmp_path):
    photos = tmp_path / "photos"
    for i in range(5):  # 50 images in 25 shards: the cluster is busy long enough to lose a worker mid-shard
        for path in PHOTOS:
            (photos / f"copy{i}").mkdir(parents=True, exist_ok=True)
            (photos / f"copy{i}" / path.name).write_bytes(path.read_bytes())
    store = tmp_path / "store"
    args = ["build", photos, "--store", store, "--teacher", TINY_TEACHER, "--pretrained", "none", "--shard-size", "2",
            "--chunk-size", "2", "--batch-size", "1", "--image-size", "64", "--no-progress", "--workers", "2"]
    build_process = subprocess.Popen([sys.executable, "-m", "zeroseg.pipeline.cli", *map(str, args)], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    deadline = time.time() + 120
    while time.time() < deadline and len(list((store / "manifest").glob("shard-*.parquet"))) < 2:
        time.sleep(0.01)
    children = psutil.Process(build_process.pid).children(recursive=True)
    workers = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)
    committed_at_kill = len(list((store / "manifest").glob("shard-*.parquet")))
    stdout, stderr = build_process.communicate(timeout=180)
    assert committed_at_kill < 25, "the kill should land mid-build"
    assert build_process.returncode == 0, stderr
    assert "Dask dashboard: http://" in stderr and "cached 50 images, 0 errors" in stdout
    verified = run_cli("zeroseg.pipeline.cli", "verify", store, "--no-progress")
    assert verified.returncode == 0 and "50 ok rows, 0 errors, 25 shards" in verified.stdout
    assert not workers[0].is_running()


def test_inputs_a_worker_cannot_see_stop_the_build_with_one_line(cluster, photos, tmp_path):
    with pytest.raises(UserError, match=r"^worker tcp://\S+ cannot see the source '.*elsewhere': sources and the "
                                        r"store must be on a filesystem that every worker mounts at the same path$"):
        require_visible(cluster, {"store": str(tmp_path), "source": str(tmp_path / "elsewhere")})
    identity = resolve_identity(str(TINY_TEACHER), "none")
    job = ShardJob(Shard(0, ["a.jpg"]), str(tmp_path / "gone"), open_source(photos).spec,
                   TeacherSpec(identity, "cpu"), EncodeSettings((1,), 1, 64, "photos", False),
                   decode_threads=1, progress_topic="unused")
    refused = cluster.submit(encode_shard_on_worker, job, pure=False).result()
    assert isinstance(refused, WorkerUserError) and "cannot see the store" in refused.message


def test_cluster_arguments_are_one_line_errors(photos, tmp_path):
    common = ["--store", tmp_path / "store", "--teacher", TINY_TEACHER, "--pretrained", "none", "--no-progress"]
    both = invoke(zs_cache, "build", photos, *common, "--scheduler", "tcp://127.0.0.1:1", "--workers", "2")
    assert both.returncode == 2 and "--scheduler and --workers exclude each other" in both.stderr
    one_gpu = invoke(zs_cache, "build", photos, *common, "--workers", "2", "--device", "cuda:1")
    assert one_gpu.returncode == 2 and "with --workers each worker takes its own GPU" in one_gpu.stderr
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        nobody = invoke(zs_cache, "build", photos, *common, "--scheduler", "tcp://127.0.0.1:1")
    lines = nobody.stderr.strip().splitlines()
    assert nobody.returncode == 2 and lines[-1].startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:1")


def test_ctrl_c_stops_the_cluster_quietly_and_a_rerun_resumes(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for copy in range(2):  # 20 images in 5 shards: Ctrl-C lands while the workers are mid-build
        for path in PHOTOS:
            (photos / f"{copy}-{path.name}").write_bytes(path.read_bytes())
    store = tmp_path / "store"
    command = [sys.executable, "-m", "zeroseg.pipeline.cli", "build", str(photos), "--store", str(store), "--teacher",
               str(TINY_TEACHER), "--pretrained", "none", "--device", "cpu", "--image-size", "32", "--shard-size", "4",
               "--chunk-size", "2", "--no-progress", "--workers", "2"]
    # Its own process group, as a terminal's job, and SIGINT handled as at a terminal: a test run started as a
    # background job ignores SIGINT, and so would the build it starts (it would finish and exit 0).
    build_process = subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not any((store / "manifest").glob("shard-*.parquet")):
        time.sleep(0.01)
    os.killpg(build_process.pid, signal.SIGINT)  # what Ctrl-C does: the client and its worker processes get it
    committed_at_interrupt = len(list((store / "manifest").glob("shard-*.parquet")))
    _, stderr = build_process.communicate(timeout=120)
    assert build_process.returncode == 130 and committed_at_interrupt < 5, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr, stderr
    assert " - distributed." not in stderr, stderr  # no log lines of the workers, nanny or scheduler
    assert invoke(zs_cache, *command[3:]).returncode == 0
    verified = invoke(zs_cache, "verify", str(store), "--no-progress")
    assert verified.returncode == 0 and "20 ok rows, 0 errors, 5 shards" in verified.stdout, verified.stdout
