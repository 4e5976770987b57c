"""`zs-cache build`: decode, crop and encode every new image of a source into a feature store.

The client (this process) lists the source, plans shards, reserves their rows and commits each
shard's manifest part once its features are written. The encoding runs either here or on a Dask
cluster (pipeline.dask_build); both run the steps in pipeline.shards and return what they committed.

Here: a thread pool decodes and crops ahead of the teacher (Pillow and hashlib release the GIL), the
teacher encodes batches of crops on its device, and a writer thread compresses and commits each
finished shard while the teacher goes on with the next.

`--dry-run` (`dry_run`) says what a build would do and the disk it needs, before any teacher runs. Sizes are
computed, not measured: features are N x V x D float16 (zstd gains little on them: the stored size is about
this); crops N x S x S x 3 uint8 before compression (zstd keeps about 80% of photo crops, measured on the
fixture photos).
"""

import math
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path

import open_clip
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from zeroseg.errors import UserError
from zeroseg.io import human_size
from zeroseg.pipeline.integrity import missing_chunks
from zeroseg.pipeline.options import DEFAULT_SHARD_SIZE, BuildOptions
from zeroseg.pipeline.shards import (
    Encoded,
    EncodeSettings,
    Shard,
    decode_item,
    encode_shard,
    plan_and_reserve,
    prepare_store,
    register_source,
    store_decode,
    write_and_commit,
)
from zeroseg.pipeline.sources import ListSource, Source, open_source
from zeroseg.pipeline.store import FeatureStore, builder_lock
from zeroseg.pipeline.store_meta import StoreMeta
from zeroseg.pipeline.teacher import Teacher, resolve_identity
from zeroseg.pipeline.teacher_identity import TeacherIdentity
from zeroseg.runtime import bar_disabled, prefetch_map, resolve_device


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

    def add(self, encoded: Encoded) -> None:
        for records in encoded.shards:
            self.shards += 1
            self.processed += len(records)
            self.errors += sum(not r.ok for r in records)
            self.error_reasons.update(r.error.split(":")[0] for r in records if not r.ok)
        self.ok = self.processed - self.errors
        self.seconds += encoded.seconds

    def line(self) -> str:
        if not self.processed:
            return f"nothing to do: all {self.total_in_source} images of the source are already in {self.store}"
        return (
            f"cached {self.ok} images, {self.errors} errors ({100 * self.error_fraction:.1f}%), "
            f"{self.shards} shards in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s) -> {self.store}"
        )


def check_compatible(meta: StoreMeta, identity: TeacherIdentity, opts: BuildOptions) -> None:
    stored = meta.teacher
    if not stored.same_teacher(identity):
        raise UserError(
            f"store '{opts.store}' was built with teacher {stored.model} ({stored.pretrained or 'random weights'}, "
            f"quick_gelu={stored.quick_gelu}); this build asks for {identity.model} "
            f"({identity.pretrained or 'random weights'}, quick_gelu={identity.quick_gelu}): use another --store"
        )
    if list(meta.grids) != list(opts.grids):
        raise UserError(f"store '{opts.store}' holds grids {meta.grids}; this build asks for {opts.grids}")
    if meta.preprocessing.crop_size != opts.image_size:
        raise UserError(
            f"store '{opts.store}' holds {meta.preprocessing.crop_size}px crops; this build asks for "
            f"--image-size {opts.image_size}"
        )
    if opts.shard_size is not None and opts.shard_size != meta.shard_size:
        raise UserError(f"store '{opts.store}' uses --shard-size {meta.shard_size}; leave it out or use that")
    store_decode(meta, opts)


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


def pending_keys(store: FeatureStore, keys: list[str], name: str) -> list[str]:
    """The source's keys (in source order) that source `name` has no manifest row for yet; a hash join in
    Arrow, so a no-op rerun over millions of keys makes no Python set of them."""
    done = store.manifest(columns=["key", "source"])
    cached = done.filter(pc.equal(done["source"], name))["key"]
    seen = pc.is_in(pa.array(keys, pa.string()), value_set=cached.combine_chunks()).to_numpy(zero_copy_only=False)
    return list(compress(keys, ~seen))


def open_build_source(opts: BuildOptions) -> tuple[Source, str, list[str]]:
    """The source of the options, its name inside the store and its keys (UserError when it has none)."""
    source = open_source(opts.source, opts.column)
    keys = source.keys()
    if not keys:
        raise UserError(f"no images found in '{opts.source}'")
    if isinstance(source, ListSource) and not opts.outside_paths:
        source.refuse_outside_paths(keys)
    return source, opts.source_name or Path(source.spec.path).stem, keys


def run_build(opts: BuildOptions, log: Callable[[str], None] = print) -> BuildSummary:
    """Bring the store up to date with the source; returns what was done (raises UserError on misuse)."""
    source, name, keys = open_build_source(opts)
    if source.duplicates:
        path, same = next(iter(source.duplicates.items()))
        log(f"source: {len(source.duplicates)} paths reach files or folders already listed (links), cached once: "
            f"e.g. '{path}' is '{same}'")
    identity = resolve_identity(opts.teacher, opts.pretrained, opts.quick_gelu)
    on_cluster = bool(opts.scheduler or opts.scheduler_file or opts.workers)
    device = None if on_cluster else resolve_device(opts.device)
    summary = BuildSummary(store=opts.store, total_in_source=len(keys))
    if not FeatureStore.exists(opts.store):
        FeatureStore.check_creatable(opts.store)  # before the lock file is made in someone else's folder
    with builder_lock(opts.store):
        store = FeatureStore.open(opts.store, writable=True) if FeatureStore.exists(opts.store) else None
        if store is not None:
            store.remove_partial_parts()  # of a killed build or compact
            check_compatible(store.meta, identity, opts)
            register_source(store.meta, source, name)
            if opts.repair:
                remove_damaged(store, opts.progress, log)
            else:
                refuse_missing_chunks(store)
            pending = pending_keys(store, keys, name)
        else:
            FeatureStore.check_creatable(opts.store)
            pending = keys
        store_crops = wants_crops(store, source, opts)
        if not pending:
            return summary
        settings = EncodeSettings(
            tuple(opts.grids), opts.batch_size, opts.image_size, name, store_crops, opts.max_pixels,
            int(opts.max_file_mb * 2**20), store_decode(store.meta if store else None, opts),
        )
        if on_cluster:
            from zeroseg.pipeline.dask_build import build_on_cluster  # Dask only for cluster builds

            summary.add(build_on_cluster(store, source, pending, identity, settings, opts, log))
        else:
            teacher = Teacher(identity, device, compile=opts.compile)
            store = prepare_store(store, source, identity, teacher.format(), settings, opts)
            shards = plan_and_reserve(store, source, pending)
            log(f"caching {len(pending)} new images of {source.spec.path} in {len(shards)} shards on {device}, "
                f"teacher {identity.describe()}")
            summary.add(_encode_here(store, source, shards, teacher, settings, opts))
    return summary


def remove_damaged(store: FeatureStore, progress: bool, log: Callable[[str], None]) -> None:
    """Un-commit every shard that verify finds damaged, so that its images are pending again: this build
    caches those of its source, a build of their own source the others."""
    from zeroseg.pipeline.check import find_damage

    damage = find_damage(store, progress)
    if damage.unrepairable:
        raise UserError(f"cannot repair store '{store.path}': {damage.unrepairable[0]}")
    for shard, problems in sorted(damage.shards.items()):
        store.remove_shard(shard)
        log(f"repair: shard {shard} is damaged ({problems[0]}): redoing it")
    if not damage.shards:
        log(f"repair: store '{store.path}' has no damaged shard")


def refuse_missing_chunks(store: FeatureStore) -> None:
    """A store whose commit records name chunk files that are gone is not "up to date": say how to repair it."""
    for shard, record in store.records().items():
        lost = missing_chunks(store.path, record)
        if lost:
            raise UserError(
                f"store '{store.path}': shard {shard} lost chunk {lost[0]}"
                f"{f' and {len(lost) - 1} more' if len(lost) > 1 else ''}: run zs-cache build --repair to redo it"
            )


def _encode_here(
    store: FeatureStore,
    source: Source,
    shards: list[Shard],
    teacher: Teacher,
    settings: EncodeSettings,
    opts: BuildOptions,
) -> Encoded:
    started, encoded = time.perf_counter(), Encoded()
    decoded = prefetch_map(
        lambda key: decode_item(source, key, opts.image_size, settings.max_pixels, settings.max_bytes, settings.decode),
        (key for shard in shards for key in shard.keys),
        workers=opts.decode_threads,
        ahead=4 * opts.batch_size,
    )
    total = sum(len(shard.keys) for shard in shards)
    bar = tqdm(total=total, unit="img", desc="zs-cache", disable=bar_disabled(opts.progress), smoothing=0.1)
    with ThreadPoolExecutor(1) as writer:
        previous: Future | None = None
        for shard in shards:
            features, crops, records = encode_shard(shard, store.shard_rows(shard.id), decoded, teacher, settings,
                                                    bar.update)
            if previous is not None:
                previous.result()
            previous = writer.submit(write_and_commit, store, shard.id, features, crops, records)
            encoded.shards.append(records)
        if previous is not None:
            previous.result()
    bar.close()
    encoded.seconds = time.perf_counter() - started
    return encoded


def dry_run(opts: BuildOptions) -> list[str]:
    """Lines saying how many images a build would cache and the size of what it would store."""
    source, name, keys = open_build_source(opts)
    identity = resolve_identity(opts.teacher, opts.pretrained, opts.quick_gelu)
    store = FeatureStore.open(opts.store) if FeatureStore.exists(opts.store) else None
    cached = 0
    if store is not None:
        check_compatible(store.meta, identity, opts)
        done = store.manifest(columns=["source"]).column("source").to_pylist()
        cached = done.count(name)
    pending = max(len(keys) - cached, 0)
    shard_size = store.meta.shard_size if store is not None else opts.shard_size or DEFAULT_SHARD_SIZE
    embed_dim = int(open_clip.get_model_config(identity.model)["embed_dim"])
    views = sum(grid * grid for grid in opts.grids)
    features = pending * views * embed_dim * 2
    lines = [
        f"dry run: {len(keys):,} images in {source.spec.path}, {cached:,} already in the store, {pending:,} to cache "
        f"in {math.ceil(pending / shard_size):,} shards of {shard_size}",
        f"features {pending:,} x {views} views x {embed_dim} float16 = {human_size(features)}",
    ]
    if wants_crops(store, source, opts):
        crops = pending * opts.image_size**2 * 3
        lines.append(f"crops    {pending:,} x {opts.image_size}x{opts.image_size}x3 uint8 = {human_size(crops)} "
                     f"before zstd (about {human_size(int(crops * 0.8))} stored)")
    lines.append("nothing was computed or written; run again without --dry-run to build")
    return lines
