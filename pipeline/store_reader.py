"""Stage two's one door into a feature store: `StoreReader` opens a store with all its checks, holds its usable
rows, and reads a features chunk at a time (its features, and its stored crops or its images' records) with
every integrity check and the "parts changed under me" retry inside; `SourceImages` decodes the images of a
store that keeps no crops exactly as the build did.

What the trainer needs of the store's format comes from here too (StoreMeta, and pipeline.device_decode's
EncodedBatch, decode_crops and check_decode_device for stores of decode "device", whose images the training step
decodes on its device): trainer/ imports pipeline through this module and pipeline.crops (the crop geometry both
stages share) only.

Memory: only the rows stay in memory (8 bytes per sample; names checked for duplicates by their 64-bit digests);
a chunk's image records are read from the row groups of its shard's manifest part that overlap the chunk.
"""

import hashlib
import os
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr

from zeroseg.errors import UserError
from zeroseg.pipeline.crops import crop_from_bytes
from zeroseg.pipeline.device_decode import EncodedBatch, check_decode_device, decode_crops, parse_image
from zeroseg.pipeline.integrity import chunk_key
from zeroseg.pipeline.manifest import NAME_DIGEST, ImageRecord, name_digests
from zeroseg.pipeline.sources import Source, source_from_spec
from zeroseg.pipeline.store import CROPS, FEATURES, FeatureStore
from zeroseg.pipeline.store_meta import StoreMeta

__all__ = ["CROPS", "FEATURES", "EncodedBatch", "SourceImages", "StoreMeta", "StoreReader", "check_decode_device",
           "decode_crops"]  # fmt: skip

RECORD_COLUMNS = ("source", "key", "sha256")  # a chunk's image records, as read_chunk gives them


class StoreReader:
    """The usable (status ok) rows of a store in row order (sample i is features row rows[i]) and their chunks.

    Opened once by the process that plans the run; pickled into DataLoader workers, each of which opens the
    store's arrays (and the image sources) again on first use."""

    def __init__(self, store: FeatureStore, rows: np.ndarray, required: dict[str, set[int]]):
        self.path, self.meta = store.path, store.meta
        self.rows = rows  # (N,) int64, ascending
        self.required = required  # array -> chunks whose files must exist (FeatureStore.required_chunks)
        self._store, self._pid = store, os.getpid()
        # shard -> manifest part holding it: listed at open for a store without crops, again after a compact
        self.parts: dict[int, Path] = {}
        self.images = SourceImages(store.meta)

    @classmethod
    def open(cls, path: str | Path) -> "StoreReader":
        """The store at `path` with its checks (FeatureStore.open), its ok rows (UserError when there are none, or
        when an image or a row is listed twice), and, for a store without crops, its sources opened once here
        (a missing one is one line here, not in a loader worker)."""
        store = FeatureStore.open(path)
        stored = store.meta.stored_crops
        columns = ["row", "status"] if stored else ["row", "source", "key", "status"]
        table = store.manifest(columns, each=usable_rows)  # no image or row twice (names checked by digest)
        if table.num_rows == 0:
            raise UserError(f"store '{path}' has no usable images (no manifest row with status ok)")
        rows = table["row"].to_numpy()
        if np.any(rows[1:] <= rows[:-1]):  # parts come in shard order, so rows usually ascend already
            rows = np.sort(rows)
        reader = cls(store, rows, store.required_chunks())
        if not stored:
            SourceImages(store.meta).sources  # noqa: B018 -- here, not in a loader worker: a one-line error
            reader.parts = store.parts()
        return reader

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None, "_pid": None}  # a worker opens the store again

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def store(self) -> FeatureStore:
        """The store, opened once per process."""
        if self._pid != os.getpid():
            self._store, self._pid = FeatureStore.open(self.path), os.getpid()
        return self._store

    @property
    def chunk_of(self) -> np.ndarray:
        """(N,) the Zarr chunk holding each sample's features."""
        return self.rows // self.meta.chunk_size

    @property
    def reads_stored_crops(self) -> bool:
        return self.meta.stored_crops

    def read_chunk(self, index: int) -> dict[str, np.ndarray]:
        """Features chunk `index`: "features" (chunk_size, V, D) float16, and "crops" (chunk_size, S, S, 3) uint8 in a
        store that keeps them, else its images' records (`chunk_records`). Entry i is row index * chunk_size + i.
        A chunk file that must exist but is gone, or one failing its checksum, is a UserError naming it and its rows."""
        start = index * self.meta.chunk_size
        chunk = {} if self.reads_stored_crops else self.chunk_records(index)
        for name, array in self.store.arrays().items():
            stop = min(start + self.meta.chunk_size, array.shape[0])
            read = partial(array.__getitem__, slice(start, stop))
            chunk[name] = self.checked_read(name, array, np.arange(start, stop), read)
        return chunk

    def chunk_records(self, index: int) -> dict[str, np.ndarray]:
        """The images of features chunk `index`'s samples: {"source", "key", "sha256"} -> (chunk_size,) object
        arrays, entry i for row index * chunk_size + i (None where that row is no sample). Read from the manifest
        part of the chunk's shard, listed again when a compact replaced it (FeatureStore.while_stable); UserError
        when that part no longer holds exactly the samples this run started with, or holds a malformed sha256."""
        size = self.meta.chunk_size
        rows = range(index * size, (index + 1) * size)
        expected = self.rows[np.searchsorted(self.rows, rows.start) : np.searchsorted(self.rows, rows.stop)]
        shard = rows.start // self.meta.shard_size
        store = self.store

        def read() -> tuple[Path, pa.Table]:
            part = self.parts.get(shard)
            if part is None or not part.is_file():  # a compact merged it into another since the parts were listed
                self.parts = store.parts()
                part = self.parts.get(shard)
            if part is None:
                raise self.changed(f"shard {shard}: no manifest part", rows)
            return part, store.read_part(part, ["row", "key", "source", "sha256", "status"], rows)

        part, table = store.while_stable(read)
        table = table.filter(pc.equal(table["status"], "ok"))
        found = table["row"].to_numpy()
        if not np.array_equal(np.sort(found), expected):
            raise self.changed(f"manifest part '{part}'", rows)
        hashes = pc.fill_null(table["sha256"], "0" * 64)
        if not pc.all(pc.match_substring_regex(hashes, "^[0-9a-f]{64}$")).as_py():
            raise UserError(f"manifest part '{part}': a sha256 there is not 64 hex digits; the store is damaged")
        records = {name: np.full(size, None, dtype=object) for name in RECORD_COLUMNS}
        for name in records:
            records[name][found - rows.start] = table[name].to_pylist()
        return records

    def changed(self, where: str, rows: range) -> UserError:
        """The error of features rows `rows` whose manifest entries are no longer those this run started with."""
        return UserError(
            f"store '{self.path}': {where} no longer lists the images of features rows {rows.start}-{rows.stop - 1} "
            f"this run started with (the store changed during training): restart, resuming from the last checkpoint"
        )

    def checked_read(self, name: str, array: zarr.Array, rows: np.ndarray, read) -> np.ndarray:
        """read() of `rows` of store array `name`: UserError naming the chunk and its rows when a chunk of them that
        must exist is missing (Zarr would read it as fill values), or one line naming the rows when a chunk fails
        its checksum."""
        chunk = array.chunks[0]
        for index in sorted({int(row) // chunk for row in rows} & self.required[name]):
            key = chunk_key(array, index)
            if not (self.path / name / key).is_file():
                raise UserError(
                    f"store '{self.path}': chunk {name}/{key} (rows {index * chunk}-{(index + 1) * chunk - 1}) is "
                    f"missing: run zs-cache verify, then zs-cache build --repair"
                )
        try:
            return read()
        except ValueError as exc:
            if "checksum" not in str(exc):
                raise
            raise UserError(
                f"store '{self.path}': a chunk of {name} holding rows {int(np.min(rows))}-{int(np.max(rows))} is "
                f"damaged (crc32c mismatch): run zs-cache verify, then zs-cache build --repair"
            ) from None

    def stored_crops(self, rows: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 stored crops of features rows `rows`, each chunk read and decompressed once."""
        unique, order = np.unique(rows, return_inverse=True)
        array = self.store.crops
        return self.checked_read(CROPS, array, unique, lambda: array.oindex[unique])[order]

    def source_crops(self, records: dict[str, np.ndarray]) -> np.ndarray | EncodedBatch:
        """The crops of the images `records` ({"source", "key", "sha256"} -> (B,) arrays, as read_chunk gives them):
        decoded, (B, S, S, 3) uint8, or for decode "device" parsed for the device (decode_crops finishes them)."""
        columns = (records[name].tolist() for name in RECORD_COLUMNS)
        images = [ImageRecord(source, key, sha256=sha256) for source, key, sha256 in zip(*columns)]
        return self.images.encoded(images) if self.images.decodes_on_device else self.images.crops(images)

    def identity(self) -> dict:
        """What a checkpoint records of the store it was trained on (plain values, as in the store's attribute)."""
        return {
            "path": str(self.path.resolve()),
            "teacher": self.meta.teacher.to_dict(),
            "rows": len(self),
            "grids": list(self.meta.grids),
            "crop_size": self.meta.preprocessing.crop_size,
            "embed_dim": int(self.meta.embed_dim),
            "preprocessing": self.meta.preprocessing.to_dict(),
        }


def usable_rows(part: pa.Table, path: Path) -> pa.Table:
    """Manifest part `path`'s ok rows without their status; its source and key columns, when read, become the
    64-bit digest of each image's name (pipeline.manifest.NAME_DIGEST), enough to refuse an image listed twice."""
    part = part.filter(pc.equal(part["status"], "ok")).drop_columns(["status"])
    if "key" not in part.column_names:
        return part
    digests = name_digests(part["source"], part["key"])
    return part.drop_columns(["source", "key"]).append_column(NAME_DIGEST, pa.array(digests, pa.uint64()))


class SourceImages:
    """The images behind manifest rows, read from the store's sources, checked against their sha256, and cropped
    with the build's own decode and crop (decode "device": only their CPU part, `encoded`; decode_crops finishes
    them on the device). The sources are opened lazily, once per process (safe to pickle before first use)."""

    def __init__(self, meta: StoreMeta):
        self.source_specs = dict(meta.sources)
        self.crop_size = meta.preprocessing.crop_size
        self.decode = meta.preprocessing.decode

    @property
    def decodes_on_device(self) -> bool:
        """Whether the crops come as `encoded` batches, to be decoded on the compute device."""
        return self.decode == "device"

    @cached_property
    def sources(self) -> dict[str, Source]:
        return {name: source_from_spec(spec) for name, spec in self.source_specs.items()}

    def crop(self, source: str, key: str, sha256: str | None = None) -> np.ndarray:
        """(S, S, 3) uint8 centre crop of one image, decoded from its source; with the manifest's sha256,
        an image that changed since it was cached is refused (its features describe other pixels)."""
        crop, _ = crop_from_bytes(self.read(source, key, sha256), self.crop_size, decode=self.decode)
        return crop

    def read(self, source: str, key: str, sha256: str | None = None) -> bytes:
        """The bytes of one image; UserError when unreadable or (with the manifest's sha256) changed."""
        try:
            data = self.sources[source].read(key)
        except OSError as exc:
            raise UserError(f"cannot read image '{key}' of source '{source}': {exc.strerror or exc}") from None
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise UserError(
                f"image '{key}' of source '{source}' changed since it was cached (sha256 differs): "
                f"restore it, or cache it into a new store"
            )
        return data

    def encoded(self, records: list[ImageRecord]) -> EncodedBatch:
        """The images of `records` parsed for a device decode (their sha256 checked when given)."""
        return EncodedBatch.of([parse_image(self.read(r.source, r.key, r.sha256)) for r in records])

    def crops(self, records: list[ImageRecord]) -> np.ndarray:
        """(n, S, S, 3) uint8 crops of the images of `records` (their sha256 checked when given)."""
        return np.stack([self.crop(r.source, r.key, r.sha256) for r in records])
