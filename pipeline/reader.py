"""Reading the images behind a store's rows, exactly as the teacher saw them (for stage two)."""

from functools import cached_property

import numpy as np

from pipeline.crops import crop_from_bytes
from pipeline.sources import Source, source_from_spec
from pipeline.store import StoreMeta


class CropReader:
    """The centre crops of manifest rows: same decode and crop functions as the build.

    Sources are reopened from the store's metadata lazily, once per process (safe to pickle into
    DataLoader workers before first use).
    """

    def __init__(self, meta: StoreMeta):
        self.source_specs = dict(meta.sources)
        self.crop_size = int(meta.preprocessing["crop_size"])

    @cached_property
    def sources(self) -> dict[str, Source]:
        return {name: source_from_spec(spec) for name, spec in self.source_specs.items()}

    def crop(self, source: str, key: str) -> np.ndarray:
        """(S, S, 3) uint8 centre crop of one image."""
        crop, _ = crop_from_bytes(self.sources[source].read(key), self.crop_size)
        return crop

    def crops(self, records: list[dict]) -> np.ndarray:
        """(n, S, S, 3) uint8 crops of manifest records (dicts with at least source, key and row)."""
        return np.stack([self.crop(r["source"], r["key"]) for r in records])
