"""`zs-cache build`: decode, crop and encode every new image of a source into a feature store.

The client (this process) lists the source, plans shards, reserves their rows and commits each
shard's manifest part once its features are written. The encoding runs either here or on a Dask
cluster (pipeline.distributed); both call `encode_shard` and `FeatureStore.write_shard`.

Here: a thread pool decodes and crops ahead of the teacher (Pillow and hashlib release the GIL), the
teacher encodes batches of crops on its device, and a writer thread compresses and commits each
finished shard while the teacher goes on with the next.
"""

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from zeroseg.pipeline.crops import crop_from_bytes, view_layout
from zeroseg.pipeline.errors import UserError
from zeroseg.pipeline.images import ImageDecodeError
from zeroseg.pipeline.runtime import prefetch_map, resolve_device
from zeroseg.pipeline.sources import Source, open_source, tar_of
from zeroseg.pipeline.store import FeatureStore, StoreMeta, builder_lock, manifest_rows
from zeroseg.pipeline.teacher import Teacher, TeacherIdentity, resolve_identity

CROP_RULE = "centre square of side min(W, H), resized to crop_size (see pipeline.crops)"
DEFAULT_SHARD_SIZE = 1024
DEFAULT_CHUNK_SIZE = 64


@dataclass
class BuildOptions:
    source: str
    store: str
    grids: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    teacher: str = "ViT-L-14"
    pretrained: str = "openai"
    quick_gelu: bool | None = None
    batch_size: int = 64
    device: str = "auto"
    shard_size: int | None = None  # None: the store's, or DEFAULT_SHARD_SIZE for a new store
    chunk_size: int = DEFAULT_CHUNK_SIZE
    image_size: int = 224
    max_error_fraction: float = 0.01
    decode_threads: int = 4
    source_name: str | None = None
    column: str | None = None
    compile: bool = False
    progress: bool = True
    store_crops: bool = False  # keep the crops in the store (implied for tar sources and stores that have them)
    scheduler: str | None = None  # address of a running Dask scheduler to build on
    workers: int = 0  # > 0: build on a local Dask cluster of this many worker processes


@dataclass
class BuildSummary:
    store: str
    total_in_source: int
    processed: int = 0
    ok: int = 0
    errors: int = 0
    shards: int = 0
    seconds: float = 0.0
    error_reasons: Counter = field(default_factory=Counter)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds else 0.0

    @property
    def error_fraction(self) -> float:
        return self.errors / self.processed if self.processed else 0.0

    def add_shard(self, records: list[dict]) -> None:
        self.shards += 1
        self.processed += len(records)
        self.errors += sum(r["error"] is not None for r in records)
        self.ok = self.processed - self.errors
        self.error_reasons.update(r["error"].split(":")[0] for r in records if r["error"])

    def line(self) -> str:
        if not self.processed:
            return f"nothing to do: all {self.total_in_source} images of the source are already in {self.store}"
        return (
            f"cached {self.ok} images, {self.errors} errors ({100 * self.error_fraction:.1f}%), "
            f"{self.shards} shards in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s) -> {self.store}"
        )


@dataclass(frozen=True)
class Shard:
    id: int
    keys: list[str]


@dataclass(frozen=True)
class EncodeSettings:
    """How each shard of one build is encoded (sent to Dask workers with every shard)."""

    grids: tuple[int, ...]
    batch_size: int
    image_size: int
    source_name: str
    store_crops: bool


@dataclass
class Decoded:
    key: str
    crop: np.ndarray | None = None  # (S, S, 3) uint8
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    error: str | None = None


def plan_shards(
    pending: list[str], committed: set[int], shard_size: int, group: Callable[[str], str] | None = None
) -> list[Shard]:
    """Cut the pending keys into shards, numbered by the lowest ids that no committed shard holds.

    A build killed after committing some shards leaves the others' ids free; replanning the same
    pending keys gives back the same shards with the same ids, so a resumed build writes exactly
    what an uninterrupted one would have. With `group`, a shard never mixes keys of two groups (the
    tars of a tar-shard source: each shard then reads one tar).
    """
    shards, next_id = [], 0
    for _, run in groupby(pending, key=group or (lambda key: None)):
        keys = list(run)
        for start in range(0, len(keys), shard_size):
            while next_id in committed:
                next_id += 1
            shards.append(Shard(next_id, keys[start : start + shard_size]))
            next_id += 1
    return shards


def decode_item(source: Source, key: str, crop_size: int) -> Decoded:
    """Read, hash, decode and crop one image; any failure becomes an error reason, never an exception."""
    try:
        data = source.read(key)
    except OSError as exc:
        return Decoded(key, error=f"unreadable: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        crop, (width, height) = crop_from_bytes(data, crop_size)
    except ImageDecodeError as exc:
        return Decoded(key, sha256=digest, error=str(exc))
    except Exception as exc:  # a decoder bug on one odd file must not end a long build
        return Decoded(key, sha256=digest, error=f"undecodable image: {type(exc).__name__}: {exc}")
    return Decoded(key, crop, width, height, digest)



def encode_shard(
    shard: Shard,
    decoded: Iterator[Decoded],
    teacher: Teacher,
    settings: EncodeSettings,
    on_image: Callable[[int], None] = lambda n: None,
) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
    """Features (n, V, D) float16, crops (n, S, S, 3) uint8 (None unless stored) and manifest records
    of one shard, taking its n images from `decoded`. Rows of failed images stay zero."""
    count, size = len(shard.keys), settings.image_size
    features = np.zeros((count, len(view_layout(settings.grids)), teacher.embed_dim), dtype=np.float16)
    crops = np.zeros((count, size, size, 3), dtype=np.uint8) if settings.store_crops else None
    records: list[dict] = []
    batch: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        stacked = np.stack([crop for _, crop in batch])
        if crops is not None:
            crops[[i for i, _ in batch]] = stacked
        pixels = torch.from_numpy(stacked)
        if teacher.device.type == "cuda":
            pixels = pixels.pin_memory()
        features[[i for i, _ in batch]] = teacher.encode_crops(pixels, settings.grids).numpy()  # (b, V, D)
        on_image(len(batch))
        batch.clear()

    for index in range(count):
        item = next(decoded)
        records.append(
            {"key": item.key, "source": settings.source_name, "sha256": item.sha256,
             "width": item.width, "height": item.height, "error": item.error}
        )
        if item.error is None:
            batch.append((index, item.crop))
            if len(batch) == settings.batch_size:
                flush()
        else:
            on_image(1)
    if batch:
        flush()
    return features, crops, records


def check_compatible(meta: StoreMeta, identity: TeacherIdentity, opts: BuildOptions) -> None:
    stored = TeacherIdentity(**meta.teacher)
    if not stored.same_teacher(identity):
        raise UserError(
            f"store '{opts.store}' was built with teacher {stored.model} ({stored.pretrained or 'random weights'}, "
            f"quick_gelu={stored.quick_gelu}); this build asks for {identity.model} "
            f"({identity.pretrained or 'random weights'}, quick_gelu={identity.quick_gelu}): use another --store"
        )
    if list(meta.grids) != list(opts.grids):
        raise UserError(f"store '{opts.store}' holds grids {meta.grids}; this build asks for {opts.grids}")
    if meta.preprocessing["crop_size"] != opts.image_size:
        raise UserError(
            f"store '{opts.store}' holds {meta.preprocessing['crop_size']}px crops; this build asks for "
            f"--image-size {opts.image_size}"
        )
    if opts.shard_size is not None and opts.shard_size != meta.shard_size:
        raise UserError(f"store '{opts.store}' uses --shard-size {meta.shard_size}; leave it out or use that")


def wants_crops(store: FeatureStore | None, source: Source, opts: BuildOptions) -> bool:
    """Whether this build stores crops: asked for, a tar source (the trainer cannot read tars at random),
    or a store that keeps them. Crops cannot be added to a store made without them."""
    is_tar = source.spec.kind == "tar"
    if store is None:
        return opts.store_crops or is_tar
    if store.meta.stored_crops:
        return True
    if is_tar:
        raise UserError(
            f"'{opts.source}' holds tar shards, which the trainer reads only through stored crops, but store "
            f"'{opts.store}' was made without --store-crops: use a new --store"
        )
    if opts.store_crops:
        raise UserError(f"store '{opts.store}' was made without --store-crops and cannot take crops: use a new --store")
    return False


def register_source(meta: StoreMeta, source: Source, name: str) -> None:
    spec = source.spec.to_dict()
    known = meta.sources.get(name)
    if known is not None and known != spec:
        raise UserError(
            f"source name '{name}' already stands for {known['path']} in this store; pass --source-name"
        )
    meta.sources[name] = spec


def describe_teacher(teacher: Teacher) -> dict:
    """What a new store records about the teacher's input and output: view_size, mean, std, embed_dim."""
    return {**teacher.preprocessing(), "embed_dim": teacher.embed_dim}


def new_store_meta(identity: TeacherIdentity, teacher: dict, opts: BuildOptions, store_crops: bool) -> StoreMeta:
    return StoreMeta(
        teacher=identity.to_dict(),
        preprocessing={
            "crop": CROP_RULE,
            "crop_size": opts.image_size,
            "interpolation": "bicubic",
            "antialias": True,
            "cell_boundaries": "floor(k * crop_size / grid)",
            "view_size": teacher["view_size"],
            "mean": teacher["mean"],
            "std": teacher["std"],
        },
        grids=list(opts.grids),
        views=[list(v) for v in view_layout(opts.grids)],
        embed_dim=teacher["embed_dim"],
        shard_size=opts.shard_size or DEFAULT_SHARD_SIZE,
        chunk_size=opts.chunk_size,
        stored_crops=store_crops,
    )


def validate(opts: BuildOptions) -> None:
    if not opts.grids or any(g < 1 for g in opts.grids) or len(set(opts.grids)) != len(opts.grids):
        raise UserError(f"--grids must be distinct positive integers, got {opts.grids}")
    for name in ("batch_size", "chunk_size", "image_size", "decode_threads"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if opts.shard_size is not None and (opts.shard_size < 1 or opts.shard_size % opts.chunk_size):
        raise UserError(f"--shard-size must be a positive multiple of the chunk size {opts.chunk_size}")
    if not 0 <= opts.max_error_fraction <= 1:
        raise UserError("--max-error-fraction must be between 0 and 1")
    if opts.workers < 0:
        raise UserError("--workers must be 0 (build in this process) or a positive number of Dask workers")
    if opts.scheduler and opts.workers:
        raise UserError("--scheduler and --workers exclude each other: build on a running cluster or start a local one")


def run_build(opts: BuildOptions, log: Callable[[str], None] = print) -> BuildSummary:
    """Bring the store up to date with the source; returns what was done (raises UserError on misuse)."""
    validate(opts)
    source = open_source(opts.source, opts.column)
    name = opts.source_name or Path(source.spec.path).stem
    keys = source.keys()
    if not keys:
        raise UserError(f"no images found in '{opts.source}'")
    identity = resolve_identity(opts.teacher, opts.pretrained, opts.quick_gelu)
    on_cluster = bool(opts.scheduler or opts.workers)
    device = None if on_cluster else resolve_device(opts.device)
    summary = BuildSummary(store=opts.store, total_in_source=len(keys))
    if not FeatureStore.exists(opts.store):
        FeatureStore.check_creatable(opts.store)  # before the lock file is made in someone else's folder
    with builder_lock(opts.store):
        store = FeatureStore.open(opts.store, writable=True) if FeatureStore.exists(opts.store) else None
        if store is not None:
            check_compatible(store.meta, identity, opts)
            register_source(store.meta, source, name)
            done = store.manifest(columns=["key", "source"]).to_pydict()
            cached = {k for k, s in zip(done["key"], done["source"]) if s == name}
            pending = [k for k in keys if k not in cached]
        else:
            FeatureStore.check_creatable(opts.store)
            pending = keys
        store_crops = wants_crops(store, source, opts)
        if not pending:
            return summary
        settings = EncodeSettings(tuple(opts.grids), opts.batch_size, opts.image_size, name, store_crops)
        if on_cluster:
            from zeroseg.pipeline.distributed import build_on_cluster

            build_on_cluster(store, source, pending, identity, settings, opts, summary, log)
        else:
            teacher = Teacher(identity, device, compile=opts.compile)
            store = prepare_store(store, source, identity, describe_teacher(teacher), settings, opts)
            shards = plan_and_reserve(store, source, pending)
            log(f"caching {len(pending)} new images of {source.spec.path} in {len(shards)} shards on {device}")
            _encode_here(store, source, shards, teacher, settings, opts, summary)
    return summary


def prepare_store(
    store: FeatureStore | None,
    source: Source,
    identity: TeacherIdentity,
    teacher: dict,
    settings: EncodeSettings,
    opts: BuildOptions,
) -> FeatureStore:
    """The store to write, created on first use; `teacher` as given by describe_teacher."""
    if store is None:
        meta = new_store_meta(identity, teacher, opts, settings.store_crops)
        register_source(meta, source, settings.source_name)
        store = FeatureStore.create(opts.store, meta)
    elif store.meta.preprocessing["view_size"] != teacher["view_size"]:
        raise UserError(f"store '{opts.store}' was built for {store.meta.preprocessing['view_size']}px views")
    store.save_meta()
    return store


def plan_and_reserve(store: FeatureStore, source: Source, pending: list[str]) -> list[Shard]:
    """Shards of the pending keys, with their rows reserved in one resize before any of them is written."""
    group = tar_of if source.spec.kind == "tar" else None
    shards = plan_shards(pending, store.committed_shards(), store.meta.shard_size, group)
    last = max(shards, key=lambda shard: store.shard_rows(shard.id) + len(shard.keys))
    store.reserve(last.id, len(last.keys))
    return shards


def _encode_here(
    store: FeatureStore,
    source: Source,
    shards: list[Shard],
    teacher: Teacher,
    settings: EncodeSettings,
    opts: BuildOptions,
    summary: BuildSummary,
) -> None:
    started = time.perf_counter()
    decoded = prefetch_map(
        lambda key: decode_item(source, key, opts.image_size),
        (key for shard in shards for key in shard.keys),
        workers=opts.decode_threads,
        ahead=4 * opts.batch_size,
    )
    total = sum(len(shard.keys) for shard in shards)
    bar = tqdm(total=total, unit="img", desc="zs-cache", disable=not opts.progress, smoothing=0.1)
    with ThreadPoolExecutor(1) as writer:
        previous: Future | None = None
        for shard in shards:
            features, crops, records = encode_shard(shard, decoded, teacher, settings, bar.update)
            if previous is not None:
                previous.result()
            previous = writer.submit(_write_and_commit, store, shard.id, features, crops, records)
            summary.add_shard(records)
        if previous is not None:
            previous.result()
    bar.close()
    summary.seconds = time.perf_counter() - started


def _write_and_commit(
    store: FeatureStore, shard: int, features: np.ndarray, crops: np.ndarray | None, records: list[dict]
) -> None:
    store.write_shard(shard, features, crops)
    store.commit(shard, manifest_rows(shard, store.shard_rows(shard), records))
