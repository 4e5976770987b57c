"""The three job specs in workflows/slurm submitted to a real single-node Slurm, with CPU settings by
environment: a store built by a Dask cluster over srun, torchrun training that is stopped by the spec's
--signal margin, checkpoints, requeues itself and resumes to the end, a finished run that the margin signal
does not requeue, and an evaluation of a run's latest checkpoint into a folder named by its step."""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PHOTOS, TINY_TEACHER, VOC_ROOT
from tests.slurm_cluster import SlurmCluster, free_port, missing_reason
from zeroseg.pipeline.check import verify
from zeroseg.pipeline.store import FeatureStore

SPECS = Path(__file__).resolve().parents[1] / "workflows" / "slurm"
TRAIN_STEPS = 60
JOB_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm():
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def job_env(**params: str) -> dict[str, str]:
    """The spec's parameters, this test's virtual environment, and one thread per process."""
    return {"VENV": sys.prefix, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **params}


def log_of(folder: Path, name: str, job_id: str) -> str:
    return (folder / f"{name}-{job_id}.log").read_text()


@pytest.fixture(scope="module")
def cache_job(slurm, tmp_path_factory):
    """cache.sbatch on one node: 2 tasks (one Dask worker each) on the fixture photos, tiny teacher, CPU."""
    folder = tmp_path_factory.mktemp("slurm-cache")
    photos = folder / "photos"
    photos.mkdir()
    for path in PHOTOS:
        shutil.copy(path, photos / path.name)
    env = job_env(
        SOURCE=str(photos), STORE=str(folder / "store"), TEACHER=str(TINY_TEACHER), PRETRAINED="none",
        BATCH_SIZE="4", DEVICE="cpu", DASK_PORT="0", DASHBOARD_PORT="0",
        EXTRA_ARGS="--image-size 32 --shard-size 4 --chunk-size 2 --no-progress",
    )  # fmt: skip
    job_id = slurm.submit(SPECS / "cache.sbatch", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                          "--gpus-per-node=2", "--time=10", env=env, cwd=folder)
    state = slurm.wait(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, JOB_TIMEOUT_S)
    return state, folder, log_of(folder, "zs-cache", job_id)


@pytest.fixture(scope="module")
def train_job(slurm, cache_job):
    """train.sbatch: torchrun with 2 gloo processes, stopped by the margin signal once it trains, requeued."""
    _, cache_folder, _ = cache_job
    folder = cache_folder.parent / "slurm-train"
    folder.mkdir()
    env = job_env(
        STORE=str(cache_folder / "store"), RUN_DIR=str(folder / "run"), STEPS=str(TRAIN_STEPS), GPUS_PER_NODE="2",
        DEVICE="cpu", RDZV_PORT=str(free_port()), SHUTDOWN_TIMEOUT="60",
        EXTRA_ARGS="--preset tiny --batch-size 2 --workers 0 --set run.log_every=1 --set schedule.warmup_steps=1",
    )  # fmt: skip
    job_id = slurm.submit(SPECS / "train.sbatch", "--nodes=1", "--cpus-per-task=2", "--gpus-per-node=2",
                          "--time=10", env=env, cwd=folder)
    metrics = folder / "run" / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.is_file() and metrics.read_text().strip()):  # training has started
        assert slurm.job(job_id).state in {"PENDING", "RUNNING"}, log_of(folder, "zs-train", job_id)
        assert time.monotonic() < deadline, f"job {job_id} wrote no metrics in {JOB_TIMEOUT_S} s"
        time.sleep(0.2)
    slurm.signal_batch(job_id, "USR1")
    requeued = slurm.wait(job_id, {"PENDING", "COMPLETED", "FAILED"}, JOB_TIMEOUT_S)
    stopped_log = log_of(folder, "zs-train", job_id)
    # Slurm starts the requeued job by itself once its hold (the test cluster's credential lifetime) has passed.
    final = slurm.wait(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, JOB_TIMEOUT_S)
    return requeued, final, folder, stopped_log, log_of(folder, "zs-train", job_id)


def test_cache_job_builds_a_store_that_verifies_on_dask_workers_over_srun(slurm, cache_job):
    state, folder, log = cache_job
    assert (state.state, state.exit_code) == ("COMPLETED", "0:0"), (log, slurm.daemon_log(state.job_id))
    assert "2 workers at tcp://127.0.0.1:" in log and "on 2 Dask workers" in log
    assert "name: worker-localhost-0" in log and "name: worker-localhost-1" in log
    problems, counts = verify(FeatureStore.open(folder / "store"), progress=False)
    assert problems == [] and counts["ok"] == len(PHOTOS) and counts["shards"] == 3
    assert not list(folder.glob("*.dask-scheduler-*.json"))


def test_train_job_checkpoints_on_the_margin_signal_requeues_and_resumes_to_the_end(slurm, train_job):
    requeued, final, folder, stopped_log, log = train_job
    job_id = final.job_id
    assert (requeued.state, requeued.restarts) == ("PENDING", 1), stopped_log
    assert "effective batch 4 (2 x 1 passes x 2 processes) on cpu" in stopped_log
    stopped = [line for line in stopped_log.splitlines() if line.startswith("stopped by SIGTERM after step")]
    assert stopped and f"of {TRAIN_STEPS}, requeueing" in stopped_log, stopped_log
    step = int(stopped[0].split()[5])
    assert 1 <= step < TRAIN_STEPS
    assert (final.state, final.exit_code, final.restarts) == ("COMPLETED", "0:0", 1), (log, slurm.daemon_log(job_id))
    assert "(restart 1): zs-train run" in log and "--resume" in log.split("(restart 1)")[1].splitlines()[0]
    assert f"trained steps {step}..{TRAIN_STEPS} of {TRAIN_STEPS}" in log
    checkpoints = sorted(p.name for p in (folder / "run" / "checkpoints").glob("step-*.pt"))
    assert checkpoints == [f"step-{step:08d}.pt", f"step-{TRAIN_STEPS:08d}.pt"]
    lines = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, TRAIN_STEPS + 1))


def test_a_finished_run_is_not_requeued_when_the_margin_signal_comes(slurm, train_job):
    """The margin signal reaches a job whose run is at its last step (here while it starts, resuming to find
    nothing to do; in the issue, during torchrun's shutdown after the last step): the job ends COMPLETED."""
    _, final, train_folder, _, _ = train_job
    assert final.state == "COMPLETED"
    folder = train_folder.parent / "slurm-train-finished"
    folder.mkdir()
    env = job_env(STORE=str(train_folder.parent / "slurm-cache" / "store"), RUN_DIR=str(train_folder / "run"),
                  STEPS=str(TRAIN_STEPS), GPUS_PER_NODE="2", DEVICE="cpu", RDZV_PORT=str(free_port()))
    job_id = slurm.submit(SPECS / "train.sbatch", "--nodes=1", "--cpus-per-task=2", "--gpus-per-node=2",
                          "--time=10", env=env, cwd=folder)
    path, deadline = folder / f"zs-train-{job_id}.log", time.monotonic() + JOB_TIMEOUT_S
    while not (path.is_file() and "(restart 0): zs-train run" in path.read_text()):  # the script has set its trap
        assert time.monotonic() < deadline and slurm.job(job_id).state in {"PENDING", "RUNNING"}
        time.sleep(0.2)
    slurm.signal_batch(job_id, "USR1")
    state = slurm.wait(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, JOB_TIMEOUT_S)
    log = log_of(folder, "zs-train", job_id)
    assert (state.state, state.exit_code, state.restarts) == ("COMPLETED", "0:0", 0), (log, slurm.daemon_log(job_id))
    assert "stop signal" in log and f"at step {TRAIN_STEPS} of {TRAIN_STEPS}, finished: not requeueing" in log


def test_eval_job_evaluates_a_runs_latest_checkpoint_into_a_folder_named_by_its_step(slurm, train_job):
    _, final, train_folder, _, _ = train_job
    assert final.state == "COMPLETED"
    folder = train_folder.parent / "slurm-eval"
    folder.mkdir()
    env = job_env(
        CHECKPOINT=str(train_folder / "run"), DATA_ROOT=str(VOC_ROOT.parents[1]), DATASETS="voc", GPUS="2",
        DEVICE="cpu", EXTRA_ARGS="--short-side 64 --max-long-side 128",
    )  # fmt: skip
    del env["TQDM_DISABLE"]  # the spec itself turns progress bars off
    job_id = slurm.submit(SPECS / "eval.sbatch", "--cpus-per-task=2", "--gpus-per-node=2", "--time=10", env=env,
                          cwd=folder)
    state = slurm.wait(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, JOB_TIMEOUT_S)
    log = log_of(folder, "zs-eval", job_id)
    assert (state.state, state.exit_code) == ("COMPLETED", "0:0"), (log, slurm.daemon_log(job_id))
    out = train_folder / "run" / "checkpoints" / f"step-{TRAIN_STEPS:08d}-eval"
    report = json.loads((out / "voc.json").read_text())
    assert (report["dataset"], report["num_images"], report["num_classes"]) == ("voc", 2, 21)
    assert 0 <= report["mIoU"] <= 100
    assert (out / "voc.md").read_text().startswith(f"# voc val: mIoU {report['mIoU']:.2f}")
    assert "\r" not in log and "it/s" not in log, log  # no progress bars
