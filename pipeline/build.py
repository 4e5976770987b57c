"""`zs-cache build`: decode, crop and encode every new image of a source into a feature store.

One process: a thread pool decodes and crops ahead of the teacher (Pillow and hashlib release the
GIL), the teacher encodes batches of crops on its device, and a writer thread compresses and commits
each finished shard while the teacher goes on with the next.
"""

import hashlib
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.crops import crop_from_bytes, view_layout
from pipeline.errors import UserError
from pipeline.images import ImageDecodeError
from pipeline.sources import Source, open_source
from pipeline.store import FeatureStore, StoreMeta, builder_lock, manifest_rows
from pipeline.teacher import Teacher, TeacherIdentity, resolve_device, resolve_identity

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
    decode_workers: int = 4
    source_name: str | None = None
    column: str | None = None
    compile: bool = False
    progress: bool = True


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


@dataclass
class Decoded:
    key: str
    crop: np.ndarray | None = None  # (S, S, 3) uint8
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    error: str | None = None


def plan_shards(pending: list[str], committed: set[int], shard_size: int) -> list[Shard]:
    """Cut the pending keys into shards, numbered by the lowest ids that no committed shard holds.

    A build killed after committing some shards leaves the others' ids free; replanning the same
    pending keys gives back the same shards with the same ids, so a resumed build writes exactly
    what an uninterrupted one would have.
    """
    shards, next_id = [], 0
    for start in range(0, len(pending), shard_size):
        while next_id in committed:
            next_id += 1
        shards.append(Shard(next_id, pending[start : start + shard_size]))
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


def prefetch_map(fn: Callable, items: Iterable, workers: int, ahead: int) -> Iterator:
    """fn over items in a thread pool, results in input order, at most `ahead` in flight."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        iterator = iter(items)
        in_flight: deque[Future] = deque(pool.submit(fn, item) for _, item in zip(range(ahead), iterator))
        while in_flight:
            result = in_flight.popleft().result()
            for item in iterator:
                in_flight.append(pool.submit(fn, item))
                break
            yield result


def encode_shard(
    shard: Shard,
    decoded: Iterator[Decoded],
    teacher: Teacher,
    grids: list[int],
    batch_size: int,
    source_name: str,
    on_image: Callable[[int], None] = lambda n: None,
) -> tuple[np.ndarray, list[dict]]:
    """Features (n, V, D) float16 and manifest records of one shard, taking its n images from `decoded`."""
    count = len(shard.keys)
    features = np.zeros((count, len(view_layout(grids)), teacher.embed_dim), dtype=np.float16)
    records: list[dict] = []
    batch: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        crops = torch.from_numpy(np.stack([crop for _, crop in batch]))
        if teacher.device.type == "cuda":
            crops = crops.pin_memory()
        encoded = teacher.encode_crops(crops, grids).numpy()  # (b, V, D)
        features[[i for i, _ in batch]] = encoded
        on_image(len(batch))
        batch.clear()

    for index in range(count):
        item = next(decoded)
        records.append(
            {"key": item.key, "source": source_name, "sha256": item.sha256,
             "width": item.width, "height": item.height, "error": item.error}
        )
        if item.error is None:
            batch.append((index, item.crop))
            if len(batch) == batch_size:
                flush()
        else:
            on_image(1)
    if batch:
        flush()
    return features, records


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


def register_source(meta: StoreMeta, source: Source, name: str) -> None:
    spec = source.spec.to_dict()
    known = meta.sources.get(name)
    if known is not None and known != spec:
        raise UserError(
            f"source name '{name}' already stands for {known['path']} in this store; pass --source-name"
        )
    meta.sources[name] = spec


def new_store_meta(teacher: Teacher, opts: BuildOptions) -> StoreMeta:
    return StoreMeta(
        teacher=teacher.identity.to_dict(),
        preprocessing={
            "crop": CROP_RULE,
            "crop_size": opts.image_size,
            "interpolation": "bicubic",
            "antialias": True,
            "cell_boundaries": "floor(k * crop_size / grid)",
            **teacher.preprocessing(),
        },
        grids=list(opts.grids),
        views=[list(v) for v in view_layout(opts.grids)],
        embed_dim=teacher.embed_dim,
        shard_size=opts.shard_size or DEFAULT_SHARD_SIZE,
        chunk_size=opts.chunk_size,
    )


def validate(opts: BuildOptions) -> None:
    if not opts.grids or any(g < 1 for g in opts.grids) or len(set(opts.grids)) != len(opts.grids):
        raise UserError(f"--grids must be distinct positive integers, got {opts.grids}")
    for name in ("batch_size", "chunk_size", "image_size"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if opts.shard_size is not None and (opts.shard_size < 1 or opts.shard_size % opts.chunk_size):
        raise UserError(f"--shard-size must be a positive multiple of the chunk size {opts.chunk_size}")
    if not 0 <= opts.max_error_fraction <= 1:
        raise UserError("--max-error-fraction must be between 0 and 1")


def run_build(opts: BuildOptions, log: Callable[[str], None] = print) -> BuildSummary:
    """Bring the store up to date with the source; returns what was done (raises UserError on misuse)."""
    validate(opts)
    source = open_source(opts.source, opts.column)
    name = opts.source_name or Path(source.spec.path).stem
    keys = source.keys()
    if not keys:
        raise UserError(f"no images found in '{opts.source}'")
    identity = resolve_identity(opts.teacher, opts.pretrained, opts.quick_gelu)
    device = resolve_device(opts.device)
    summary = BuildSummary(store=opts.store, total_in_source=len(keys))
    with builder_lock(opts.store):
        store = FeatureStore.open(opts.store, writable=True) if FeatureStore.exists(opts.store) else None
        if store is not None:
            check_compatible(store.meta, identity, opts)
            register_source(store.meta, source, name)
            done = store.manifest(columns=["key", "source"]).to_pydict()
            cached = {k for k, s in zip(done["key"], done["source"]) if s == name}
            pending = [k for k in keys if k not in cached]
        else:
            pending = keys
        if not pending:
            return summary
        teacher = Teacher(identity, device, compile=opts.compile)
        if store is None:
            meta = new_store_meta(teacher, opts)
            register_source(meta, source, name)
            store = FeatureStore.create(opts.store, meta)
        elif store.meta.preprocessing["view_size"] != teacher.view_size:
            raise UserError(f"store '{opts.store}' was built for {store.meta.preprocessing['view_size']}px views")
        store.save_meta()
        _encode_pending(store, source, name, pending, teacher, opts, summary, log)
    return summary


def _encode_pending(
    store: FeatureStore,
    source: Source,
    name: str,
    pending: list[str],
    teacher: Teacher,
    opts: BuildOptions,
    summary: BuildSummary,
    log: Callable[[str], None],
) -> None:
    shards = plan_shards(pending, store.committed_shards(), store.meta.shard_size)
    log(f"caching {len(pending)} new images of {source.spec.path} in {len(shards)} shards on {teacher.device}")
    started = time.perf_counter()
    decoded = prefetch_map(
        lambda key: decode_item(source, key, opts.image_size),
        (key for shard in shards for key in shard.keys),
        workers=opts.decode_workers,
        ahead=4 * opts.batch_size,
    )
    bar = tqdm(total=len(pending), unit="img", desc="zs-cache", disable=not opts.progress, smoothing=0.1)
    with ThreadPoolExecutor(1) as writer:
        previous: Future | None = None
        for shard in shards:
            features, records = encode_shard(shard, decoded, teacher, opts.grids, opts.batch_size, name, bar.update)
            store.reserve(shard.id, len(records))
            if previous is not None:
                previous.result()
            previous = writer.submit(_write_shard, store, shard.id, features, records)
            summary.shards += 1
            summary.processed += len(records)
            summary.errors += sum(r["error"] is not None for r in records)
            summary.error_reasons.update(r["error"].split(":")[0] for r in records if r["error"])
        if previous is not None:
            previous.result()
    bar.close()
    summary.ok = summary.processed - summary.errors
    summary.seconds = time.perf_counter() - started


def _write_shard(store: FeatureStore, shard: int, features: np.ndarray, records: list[dict]) -> None:
    store.write_features(shard, features)
    store.commit(shard, manifest_rows(shard, store.shard_rows(shard), records))
