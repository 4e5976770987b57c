"""`zs-cache build` on a Dask cluster: shards are the tasks, each worker keeps one teacher, the client commits.

The client (pipeline.build.run_build, holding the store's builder lock) plans the shards and reserves
their rows before submitting anything. A task decodes, crops and encodes one shard on a worker, writes
that shard's chunks (no other shard touches them) and returns its image records; the client commits
the shard's manifest part when the task completes, so the store's rules hold as in a one-process build.

Faults: a worker killed mid-shard leaves chunks but no manifest part, so the half shard stays
invisible; the scheduler reruns the task on a live worker (worker deaths count against Dask's
`distributed.scheduler.allowed-failures`, exceptions inside a task against RETRIES). A shard that
still fails is reported once the others are committed; if the whole cluster goes away the committed
shards stay, and running the same command again resumes.

Ctrl-C: it reaches the local workers too (one process group); they ignore it (`dask_setup`, Dask's preload
hook) and the client closes the cluster, so the user sees one line 'interrupted' and exit 130; the committed
shards stay and a rerun resumes.

Worker state: a worker process builds one Teacher per (teacher, device) at its first task and keeps
it for all later ones (the module-level cache below, counted in `worker_counts`).

Overlap: a worker runs TASKS_PER_WORKER tasks at once (Dask threads), and they take turns on its teacher
(`_teacher_turn`): while one shard compresses and writes its chunks, the next one decodes and encodes, so
the device does not wait for the writes. Start workers of an external cluster with `--nthreads 2`.

Sources and the store must be on a filesystem that every worker mounts at the same path; a worker
that cannot see them stops the build with a one-line error naming the worker.
"""

import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from distributed import Client, LocalCluster, Nanny, as_completed, get_worker
from distributed.comm import CommClosedError
from distributed.system import MEMORY_LIMIT
from tqdm import tqdm

from zeroseg.errors import UserError, first_line
from zeroseg.pipeline.device_decode import check_decode_device
from zeroseg.pipeline.manifest import ImageRecord, manifest_rows
from zeroseg.pipeline.options import BuildOptions
from zeroseg.pipeline.shards import (
    Encoded,
    EncodeSettings,
    Shard,
    decode_item,
    encode_shard,
    plan_and_reserve,
    prepare_store,
)
from zeroseg.pipeline.sources import Source, SourceSpec, source_from_spec
from zeroseg.pipeline.store import FeatureStore
from zeroseg.pipeline.teacher import Teacher, TeacherFormat
from zeroseg.pipeline.teacher_identity import TeacherIdentity
from zeroseg.runtime import bar_disabled, prefetch_map, resolve_device

RETRIES = 2
TASKS_PER_WORKER = 2  # Dask threads per local worker: one shard on the teacher while the previous one writes
WORKERS_TIMEOUT_S = 120
REPORT_EVERY_S = 0.25  # how often a task sends its shard's running image count to the client's bar


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher a worker builds (and the key of its cache)."""

    identity: TeacherIdentity
    device: str  # resolved on the worker: auto, cpu or cuda:K
    torch_threads: int | None = None  # None: torch's default in the worker process
    compile: bool = False


@dataclass(frozen=True)
class ShardJob:
    """One task: everything a worker needs to encode and write one shard."""

    shard: Shard
    store: str  # absolute path, the same on every worker
    source: SourceSpec
    teacher: TeacherSpec
    settings: EncodeSettings
    decode_threads: int
    progress_topic: str


@dataclass(frozen=True)
class WorkerUserError:
    """A task's UserError, returned rather than raised: no retries, no traceback in the worker log."""

    message: str


@dataclass(frozen=True)
class WorkerSetup:
    """How the workers of this build run their teacher."""

    device: str
    torch_threads: int | None
    decode_threads: int
    description: str


# --- on the workers ------------------------------------------------------------------------------

_teachers: dict[TeacherSpec, Teacher] = {}
_sources: dict[SourceSpec, Source] = {}
_cache_lock = threading.Lock()
_teacher_turn = threading.Lock()  # one shard at a time decodes and encodes; the others write or wait
_counts: Counter = Counter()  # teachers_built, shards_encoded: in this worker process


def worker_counts() -> dict[str, int]:
    """Teachers built and shards encoded by this worker process (read with client.run)."""
    return dict(_counts)


def dask_setup(worker) -> None:
    """Dask's preload hook in each local worker process: a terminal's Ctrl-C reaches the whole process group, and
    the client closes the cluster on it, so the worker ignores SIGINT rather than dying with a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_teacher(spec: TeacherSpec) -> Teacher:
    with _cache_lock:
        if spec not in _teachers:
            if spec.torch_threads:
                torch.set_num_threads(spec.torch_threads)
            _teachers[spec] = Teacher(spec.identity, resolve_device(spec.device), compile=spec.compile)
            _counts["teachers_built"] += 1
        return _teachers[spec]


def worker_source(spec: SourceSpec) -> Source:
    """The source, opened once per worker process (an HDF5 or tar index is read once, not per shard)."""
    with _cache_lock:
        if spec not in _sources:
            _require_path(spec.path, "source")
            _sources[spec] = source_from_spec(spec)
        return _sources[spec]


def _not_visible(worker: str, what: str, path: str) -> str:
    return (
        f"worker {worker} cannot see the {what} '{path}': sources and the store must be on a filesystem "
        "that every worker mounts at the same path"
    )


def _require_path(path: str, what: str) -> None:
    if not Path(path).exists():
        raise UserError(_not_visible(get_worker().address, what, path))


def _missing_paths(paths: dict[str, str]) -> list[str]:
    return [what for what, path in paths.items() if not Path(path).exists()]


def describe_teacher_on_worker(spec: TeacherSpec) -> TeacherFormat | WorkerUserError:
    try:
        return worker_teacher(spec).format()
    except UserError as exc:
        return WorkerUserError(str(exc))


def encode_shard_on_worker(job: ShardJob) -> tuple[list[ImageRecord], dict] | WorkerUserError:
    """Encode one shard, write its chunks, return its image records and commit record (the client commits
    them)."""
    try:
        return _encode_shard_on_worker(job)
    except UserError as exc:
        return WorkerUserError(str(exc))


def _encode_shard_on_worker(job: ShardJob) -> tuple[list[ImageRecord], dict]:
    _require_path(job.store, "store")
    source = worker_source(job.source)
    teacher = worker_teacher(job.teacher)
    worker, done, sent_at = get_worker(), 0, -math.inf
    check_decode_device(job.settings.decode_device, teacher.device.type, job.store, f"worker {worker.address} runs on")
    store = FeatureStore.open(job.store, writable=True)

    def report() -> None:  # per image, but one scheduler event per REPORT_EVERY_S at most, and one at the end
        nonlocal done, sent_at
        done += 1
        if done == len(job.shard.keys) or time.monotonic() - sent_at >= REPORT_EVERY_S:
            worker.log_event(job.progress_topic, (job.shard.id, done))
            sent_at = time.monotonic()

    settings = job.settings
    decode = partial(
        decode_item, source, crop_size=settings.image_size, max_pixels=settings.max_pixels,
        max_bytes=settings.max_bytes, decode=settings.decode,
    )
    ahead = 4 * job.settings.batch_size
    with _teacher_turn, closing(prefetch_map(decode, job.shard.keys, job.decode_threads, ahead)) as decoded:
        first_row = store.shard_rows(job.shard.id)
        features, crops, records = encode_shard(job.shard, first_row, decoded, teacher, job.settings, report)
    record = store.write_shard(job.shard.id, features, crops)  # outside the turn: the next shard encodes meanwhile
    _counts["shards_encoded"] += 1
    return records, record


# --- on the client -------------------------------------------------------------------------------


def local_cluster(workers: int, device: str, decode_threads: int) -> tuple[LocalCluster, WorkerSetup]:
    """`workers` processes with TASKS_PER_WORKER Dask threads each: on a GPU node worker i sees only GPU i (mod the
    count); on the CPU the cores are split between the workers so that they do not oversubscribe them. device: auto
    or cpu (BuildOptions refuses one device with --workers)."""
    gpus = torch.cuda.device_count() if device == "auto" else 0
    cores = max(1, len(os.sched_getaffinity(0)) // workers)
    if gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")
        envs = [{"CUDA_VISIBLE_DEVICES": visible[i % gpus]} for i in range(workers)]
        setup = WorkerSetup("cuda:0", None, min(decode_threads, cores), f"one of {gpus} GPUs each")
    else:
        envs = [{"OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores)}] * workers
        setup = WorkerSetup("cpu", cores, min(decode_threads, cores), f"cpu, {cores} torch thread(s) each")
    cluster = LocalCluster(n_workers=0, threads_per_worker=TASKS_PER_WORKER, processes=True,
                           memory_limit=MEMORY_LIMIT // workers, silence_logs=logging.ERROR, preload=[__name__])
    for index, env in enumerate(envs):
        cluster.worker_spec[index] = {"cls": Nanny, "options": {**cluster.new_spec["options"], "env": env}}
    cluster.scale(workers)
    return cluster, setup


@contextmanager
def dask_client(opts: BuildOptions, log: Callable[[str], None]) -> Iterator[tuple[Client, WorkerSetup]]:
    """A client of the cluster at --scheduler (or in --scheduler-file), or of a local cluster of --workers processes."""
    if opts.scheduler or opts.scheduler_file:
        address = opts.scheduler or scheduler_address(opts.scheduler_file)
        try:
            client = Client(address)  # gives up after Dask's distributed.comm.timeouts.connect
        except (OSError, TimeoutError, ValueError) as exc:
            raise UserError(f"cannot reach the Dask scheduler at {address}: {first_line(exc)}") from None
        setup = WorkerSetup(opts.device, None, opts.decode_threads, f"device {opts.device}")
        with client:
            _wait_for_workers(client, 1, address)
            log(f"Dask dashboard: {client.dashboard_link} ({len(client.nthreads())} workers at {address})")
            yield client, setup
        return
    cluster, setup = local_cluster(opts.workers, opts.device, opts.decode_threads)
    with cluster, Client(cluster) as client:
        _wait_for_workers(client, opts.workers, "the local cluster")
        log(f"Dask dashboard: {client.dashboard_link} ({opts.workers} local workers, {setup.description})")
        try:
            yield client, setup
        except KeyboardInterrupt:  # closing the cluster under busy workers makes them log lost heartbeats: hush them
            client.run(logging.disable, logging.CRITICAL, on_error="ignore")
            raise


def _is_lost_cancel(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return isinstance(error, NameError) and "sync.<locals>.cancel" in record.getMessage()


@contextmanager
def _quiet_lost_cancel() -> Iterator[None]:
    """distributed's sync() (2026.8) answers a Ctrl-C by cancelling the call it waits for; when the Ctrl-C lands before
    that call started, its cancel fails (NameError: `future` unset) and tornado logs the traceback. The Ctrl-C itself
    goes on (the KeyboardInterrupt is raised): that one log record is left out, so the user sees 'interrupted' only."""
    logger, quiet = logging.getLogger("tornado.application"), logging.Filter()
    quiet.filter = lambda record: not _is_lost_cancel(record)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def scheduler_address(path: str, timeout_s: float = WORKERS_TIMEOUT_S) -> str:
    """The address in the JSON file a Dask scheduler writes at start (waiting up to timeout_s for it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return json.loads(Path(path).read_text())["address"]
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise UserError(f"no Dask scheduler wrote '{path}' within {timeout_s:.0f} s") from None
        except (ValueError, KeyError, TypeError):  # a scheduler that is still writing it, or not a scheduler file
            if time.monotonic() > deadline:
                raise UserError(f"'{path}' is not a Dask scheduler file (JSON with an 'address')") from None
        time.sleep(0.2)


def raise_user_error(result):
    if isinstance(result, WorkerUserError):
        raise UserError(result.message)
    return result



def _wait_for_workers(client: Client, count: int, where: str) -> None:
    try:
        client.wait_for_workers(count, timeout=WORKERS_TIMEOUT_S)
    except TimeoutError:
        raise UserError(f"no Dask worker joined {where} within {WORKERS_TIMEOUT_S} s") from None


def require_visible(client: Client, paths: dict[str, str]) -> None:
    """Every worker must see each path (what -> path) where the client sees it."""
    for worker, missing in sorted(client.run(_missing_paths, paths).items()):
        if missing:
            raise UserError(_not_visible(worker, missing[0], paths[missing[0]]))


class ClusterProgress:
    """One bar over all workers: tasks report (shard, images taken so far) per REPORT_EVERY_S and at their end; a
    retried shard restarts at 0."""

    def __init__(self, bar: tqdm):
        self.bar = bar
        self.done: dict[int, int] = {}
        self.committed: set[int] = set()
        self.lock = threading.Lock()

    def on_event(self, event: tuple) -> None:
        _, (shard, count) = event
        self.update(shard, count)

    def update(self, shard: int, count: int, committed: bool = False) -> None:
        with self.lock:
            if shard in self.committed:
                return
            self.bar.update(count - self.done.get(shard, 0))
            self.done[shard] = count
            if committed:
                self.committed.add(shard)


def build_on_cluster(
    store: FeatureStore | None,
    source: Source,
    pending: list[str],
    identity: TeacherIdentity,
    settings: EncodeSettings,
    opts: BuildOptions,
    log: Callable[[str], None],
) -> Encoded:
    """pipeline.build.run_build's encoding step on Dask (called with the builder lock held): the shards it
    committed."""
    store_path = str(Path(opts.store).resolve())
    encoded = Encoded()
    try:
        with _quiet_lost_cancel(), dask_client(opts, log) as (client, setup):
            require_visible(client, {"source": source.spec.path, "store": store_path})
            teacher = TeacherSpec(identity, setup.device, setup.torch_threads, opts.compile)
            description = raise_user_error(client.submit(describe_teacher_on_worker, teacher, pure=False).result())
            store = prepare_store(store, source, identity, description, settings, opts)
            settings = replace(settings, decode_device=store.meta.preprocessing.decode_device)  # every worker's
            shards = plan_and_reserve(store, source, pending)
            log(f"caching {len(pending)} new images of {source.spec.path} in {len(shards)} shards "
                f"on {len(client.nthreads())} Dask workers, teacher {identity.describe()}")
            job = partial(ShardJob, store=store_path, source=source.spec, teacher=teacher,
                          settings=settings, decode_threads=setup.decode_threads)
            _run_shards(client, store, shards, job, opts.progress, encoded)
    except (CancelledError, CommClosedError) as exc:
        raise UserError(
            f"lost the Dask cluster ({type(exc).__name__}) after committing {len(encoded.shards)} shards; "
            "run the same command again to resume"
        ) from None
    return encoded


def _run_shards(
    client: Client,
    store: FeatureStore,
    shards: list[Shard],
    job: Callable[..., ShardJob],
    show_progress: bool,
    encoded: Encoded,
) -> None:
    """Submit one task per shard and commit each shard as its task completes, recording it in `encoded`
    (which thus holds the committed shards when the cluster goes away)."""
    topic = f"zs-cache-progress-{uuid.uuid4().hex}"
    bar = tqdm(total=sum(len(s.keys) for s in shards), unit="img", desc="zs-cache", disable=bar_disabled(show_progress),
               smoothing=0.1)
    progress = ClusterProgress(bar)
    client.subscribe_topic(topic, progress.on_event)
    started = time.perf_counter()
    futures = {
        client.submit(encode_shard_on_worker, job(shard=shard, progress_topic=topic),
                      key=f"zs-cache-shard-{shard.id}-{topic[-8:]}", retries=RETRIES): shard
        for shard in shards
    }
    failures: list[str] = []
    try:
        for future in as_completed(futures):
            shard = futures.pop(future)  # released below: a lost worker must not recompute committed shards
            try:
                records, record = raise_user_error(future.result())  # inputs not visible, teacher not loadable: stop
            except (CancelledError, CommClosedError):
                raise  # the cluster went away: build_on_cluster says so
            except Exception as exc:  # the shard killed too many workers, or a bug: let the other shards finish
                failures.append(f"shard {shard.id}: {type(exc).__name__}: {first_line(exc)}")
                continue
            store.commit(shard.id, manifest_rows(shard.id, records), record)
            progress.update(shard.id, len(records), committed=True)
            encoded.shards.append(records)
            future.release()
    finally:
        client.cancel(list(futures))
        client.unsubscribe_topic(topic)
        bar.close()
    encoded.seconds = time.perf_counter() - started
    if failures:
        raise UserError(
            f"{len(failures)} of {len(shards)} shards failed ({failures[0]}); the other {len(encoded.shards)} are "
            "committed: run the same command again to retry the failed ones"
        )
