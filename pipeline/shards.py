"""The steps both build drivers run (pipeline.build in this process, pipeline.dask_build on a cluster):
prepare the store, plan the pending keys into shards and reserve their rows, decode and encode one shard,
write and commit it."""

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import groupby

import numpy as np
import torch

from zeroseg.errors import UserError
from zeroseg.pipeline.crops import crop_from_bytes
from zeroseg.pipeline.device_decode import EncodedBatch, ParsedImage, check_decode_device, decode_crops, parse_image
from zeroseg.pipeline.images import ImageDecodeError
from zeroseg.pipeline.manifest import ImageRecord, manifest_rows
from zeroseg.pipeline.options import DEFAULT_SHARD_SIZE, BuildOptions
from zeroseg.pipeline.sources import Source, tar_of
from zeroseg.pipeline.store import FeatureStore
from zeroseg.pipeline.store_meta import Preprocessing, StoreMeta, view_layout
from zeroseg.pipeline.teacher import Teacher, TeacherFormat
from zeroseg.pipeline.teacher_identity import TeacherIdentity


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
    max_pixels: int | None = None  # images of more pixels are error rows (from their header)
    max_bytes: int | None = None  # files of more bytes are error rows
    decode: str = "full"  # pipeline.images.DECODES: the store's, so that every shard decodes alike
    decode_device: str | None = None  # decode "device": the store's device type, which every teacher must have


@dataclass
class Decoded:
    key: str
    crop: np.ndarray | None = None  # (S, S, 3) uint8
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    error: str | None = None
    parsed: ParsedImage | None = None  # decode "device": the CPU part, cropped on the teacher's device


@dataclass
class Encoded:
    """What a driver returns: the image records of each shard it committed, and the seconds it took."""

    shards: list[list[ImageRecord]] = field(default_factory=list)
    seconds: float = 0.0


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


def decode_item(
    source: Source,
    key: str,
    crop_size: int,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    decode: str = "full",
) -> Decoded:
    """Read (a regular file of at most max_bytes), hash, decode (at most max_pixels) and crop one image (decode
    "device": only parse it, encode_shard crops it on the teacher's device); any failure becomes an error reason,
    never an exception."""
    try:
        data = source.read(key, max_bytes)
    except OSError as exc:
        return Decoded(key, error=f"unreadable: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        if decode == "device":
            parsed = parse_image(data, max_pixels)
            return Decoded(key, width=parsed.size[0], height=parsed.size[1], sha256=digest, parsed=parsed)
        crop, (width, height) = crop_from_bytes(data, crop_size, max_pixels, decode)
    except ImageDecodeError as exc:
        return Decoded(key, sha256=digest, error=str(exc))
    except Exception as exc:  # a decoder bug on one odd file must not end a long build
        return Decoded(key, sha256=digest, error=f"undecodable image: {type(exc).__name__}: {exc}")
    return Decoded(key, crop, width, height, digest)


def encode_shard(
    shard: Shard,
    first_row: int,
    decoded: Iterator[Decoded],
    teacher: Teacher,
    settings: EncodeSettings,
    on_image: Callable[[], None] = lambda: None,
) -> tuple[np.ndarray, np.ndarray | None, list[ImageRecord]]:
    """Features (n, V, D) float16, crops (n, S, S, 3) uint8 (None unless stored) and image records of one
    shard whose rows start at first_row, taking its n images from `decoded`. Rows of failed images stay zero.
    Decode "device": the batch's crops are decoded on the teacher's device; an image its decoder rejects is an
    error record. on_image() is called for each image as it is taken from `decoded` (decoded, or an error row),
    so that a progress bar moves per image even when one batch takes the teacher minutes."""
    count, size = len(shard.keys), settings.image_size
    features = np.zeros((count, len(view_layout(settings.grids)), teacher.embed_dim), dtype=np.float16)
    crops = np.zeros((count, size, size, 3), dtype=np.uint8) if settings.store_crops else None
    records: list[ImageRecord] = []
    batch: list[tuple[int, Decoded]] = []

    def flush() -> None:
        indices = [i for i, _ in batch]
        if settings.decode == "device":
            pixels, errors = decode_crops(EncodedBatch.of([item.parsed for _, item in batch]), size, teacher.device)
            for index, error in zip(indices, errors):
                if error is not None:
                    records[index] = replace(records[index], row=None, width=None, height=None, error=error)
            kept = [position for position, error in enumerate(errors) if error is None]
            indices, pixels = [indices[p] for p in kept], pixels[kept]  # (b, S, S, 3) on the device
        else:
            pixels = torch.from_numpy(np.stack([item.crop for _, item in batch]))  # (b, S, S, 3)
            if teacher.device.type == "cuda":
                pixels = pixels.pin_memory()
        if indices:
            if crops is not None:
                crops[indices] = pixels.cpu().numpy()
            features[indices] = teacher.encode_crops(pixels, settings.grids).numpy()  # (b, V, D)
        batch.clear()

    for index in range(count):
        item = next(decoded)
        row = first_row + index if item.error is None else None
        record = ImageRecord(settings.source_name, item.key, row, item.sha256, item.width, item.height, item.error)
        records.append(record)
        on_image()
        if item.error is None:
            batch.append((index, item))
            if len(batch) == settings.batch_size:
                flush()
    if batch:
        flush()
    return features, crops, records


def register_source(meta: StoreMeta, source: Source, name: str) -> None:
    known = meta.sources.get(name)
    if known is not None and known != source.spec:
        raise UserError(
            f"source name '{name}' already stands for {known.path} in this store; pass --source-name"
        )
    meta.sources[name] = source.spec


def new_store_meta(
    identity: TeacherIdentity, teacher: TeacherFormat, opts: BuildOptions, store_crops: bool
) -> StoreMeta:
    decode = store_decode(None, opts)
    return StoreMeta(
        teacher=identity,
        preprocessing=Preprocessing.of(
            opts.image_size, teacher.view_size, teacher.mean, teacher.std, decode=decode,
            decode_device=teacher.device_type if decode == "device" else None,
        ),
        grids=list(opts.grids),
        embed_dim=teacher.embed_dim,
        shard_size=opts.shard_size or DEFAULT_SHARD_SIZE,
        chunk_size=opts.chunk_size,
        stored_crops=store_crops,
    )


def store_decode(meta: StoreMeta | None, opts: BuildOptions) -> str:
    """How the images of this build are decoded: as the store's, or
    --decode (default full) for a new store; a --decode that differs from the store's is refused."""
    if meta is None:
        return opts.decode or "full"
    recorded = meta.preprocessing.decode
    if opts.decode is not None and opts.decode != recorded:
        raise UserError(
            f"store '{opts.store}' was built with --decode {recorded}; this build asks for --decode {opts.decode}: "
            f"leave it out or use a new --store"
        )
    return recorded


def prepare_store(
    store: FeatureStore | None,
    source: Source,
    identity: TeacherIdentity,
    teacher: TeacherFormat,
    settings: EncodeSettings,
    opts: BuildOptions,
) -> FeatureStore:
    """The store to write, created on first use for the loaded teacher's `teacher` format (a device-decode store
    takes only teachers on its device type)."""
    if store is None:
        meta = new_store_meta(identity, teacher, opts, settings.store_crops)
        register_source(meta, source, settings.source_name)
        store = FeatureStore.create(opts.store, meta)
    elif store.meta.preprocessing.view_size != teacher.view_size:
        raise UserError(f"store '{opts.store}' was built for {store.meta.preprocessing.view_size}px views")
    check_decode_device(store.meta.preprocessing.decode_device, teacher.device_type, opts.store, "this build runs on")
    store.save_meta()
    return store


def plan_and_reserve(store: FeatureStore, source: Source, pending: list[str]) -> list[Shard]:
    """Shards of the pending keys, with their rows reserved in one resize before any of them is written."""
    group = tar_of if source.spec.kind == "tar" else None
    shards = plan_shards(pending, store.committed_shards(), store.meta.shard_size, group)
    last = max(shards, key=lambda shard: store.shard_rows(shard.id) + len(shard.keys))
    store.reserve(last.id, len(last.keys))
    return shards


def write_and_commit(
    store: FeatureStore, shard: int, features: np.ndarray, crops: np.ndarray | None, records: list[ImageRecord]
) -> None:
    record = store.write_shard(shard, features, crops)
    store.commit(shard, manifest_rows(shard, records), record)
