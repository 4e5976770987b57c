"""Reading the images behind a store's rows, exactly as the teacher saw them (for stage two)."""

import hashlib
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import zarr

from zeroseg.errors import UserError
from zeroseg.pipeline.crops import crop_from_bytes
from zeroseg.pipeline.device_decode import EncodedBatch, parse_image
from zeroseg.pipeline.integrity import checked_read
from zeroseg.pipeline.manifest import ImageRecord
from zeroseg.pipeline.sources import Source, source_from_spec
from zeroseg.pipeline.store import CROPS
from zeroseg.pipeline.store_meta import StoreMeta


class CropReader:
    """The centre crops of manifest rows: read from the store's `crops` array when the store keeps
    them and its path is given, otherwise decoded from the sources with the build's own functions (decode
    "device": only their CPU part, `encoded`; pipeline.device_decode.decode_crops finishes them on the device).

    Stored crops are chunked like the features (chunk_size images per chunk): read rows chunk by
    chunk (shuffle chunks, then rows within a few buffered chunks) rather than one row per chunk.
    Sources and the array are opened lazily, once per process (safe to pickle into DataLoader
    workers before first use).
    """

    def __init__(self, meta: StoreMeta, store: str | Path | None = None, required: set[int] | frozenset = frozenset()):
        """required: indices of the crops chunks that must exist (FeatureStore.required_chunks)."""
        self.source_specs = dict(meta.sources)
        self.crop_size = meta.preprocessing.crop_size
        self.decode = meta.preprocessing.decode
        self.store = str(store) if store is not None and meta.stored_crops else None
        self.required = set(required)

    @property
    def reads_stored_crops(self) -> bool:
        return self.store is not None

    @property
    def decodes_on_device(self) -> bool:
        """Whether the crops come as `encoded` batches, to be decoded on the compute device."""
        return self.decode == "device" and not self.reads_stored_crops

    @cached_property
    def sources(self) -> dict[str, Source]:
        return {name: source_from_spec(spec) for name, spec in self.source_specs.items()}

    @cached_property
    def stored(self) -> zarr.Array:
        return zarr.open_array(f"{self.store}/{CROPS}", mode="r")

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
        if self.reads_stored_crops:
            rows, order = np.unique([r.row for r in records], return_inverse=True)
            read = partial(self.stored.oindex.__getitem__, rows)
            stored = checked_read(Path(self.store), CROPS, self.stored, self.required, rows, read)
            return stored[order]  # each chunk is read and decompressed once
        return np.stack([self.crop(r.source, r.key, r.sha256) for r in records])
