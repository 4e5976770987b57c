"""Training batches from a feature store: the crops the teacher saw and its features, read chunk by chunk.

StoreSamples  the usable (status ok) rows of a store, their image keys, and the store's identity
check_store   refuse, with one line, a store that does not fit the model and loss configuration
StoreBatches  map-style dataset: this process's device batch j -> Batch, in the order of trainer.sampling
make_loader   a DataLoader over device batches [first, last): worker processes, pinned memory
ModelInput    on the device: uint8 crops -> normalised float images of the model's input size

Each DataLoader worker keeps the last 2 x shuffle_window decompressed feature chunks, so a worker reads each
chunk once per window it serves (one Zarr read of the chunk's rows) however many of its batches draw from
that chunk. Images always come through pipeline.reader.CropReader: the store's own crops when it keeps them
(zs-cache build --store-crops), else the source images through the same decode and crop as the build.
"""

import os
import signal
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import zarr
from torch.utils.data import DataLoader, Dataset

from zeroseg.pipeline.crops import channel_stats, to_model_input
from zeroseg.pipeline.errors import UserError
from zeroseg.pipeline.integrity import checked_read
from zeroseg.pipeline.reader import CropReader
from zeroseg.pipeline.store import CROPS, FEATURES, FeatureStore, StoreMeta
from zeroseg.trainer.losses import LossConfig
from zeroseg.trainer.model_config import ModelConfig
from zeroseg.trainer.sampling import BatchPlan, SampleOrder


class Batch(NamedTuple):
    crops: torch.Tensor  # (B, S, S, 3) uint8, the centre crops the teacher saw
    features: torch.Tensor  # (B, V, D) float16, the teacher's features of the V stored views
    rows: torch.Tensor  # (B,) int64, the store rows


@dataclass
class StoreSamples:
    """The usable rows of a store in row order: sample i is feature row rows[i] of image (sources[i], keys[i])."""

    path: Path
    meta: StoreMeta
    rows: np.ndarray  # (N,) int64, ascending
    keys: pa.Array  # (N,) string
    sources: pa.Array  # (N,) string
    hashes: pa.Array  # (N,) string, sha256 of each image's bytes when cached
    required: dict[str, set[int]]  # array -> chunks whose files must exist (FeatureStore.required_chunks)

    @classmethod
    def open(cls, path: str | Path) -> "StoreSamples":
        store = FeatureStore.open(path)
        table = store.manifest(["row", "key", "source", "sha256", "status"])
        table = table.filter(pc.equal(table["status"], "ok")).sort_by("row")
        if table.num_rows == 0:
            raise UserError(f"store '{path}' has no usable images (no manifest row with status ok)")
        if not store.meta.stored_crops:
            CropReader(store.meta).sources  # noqa: B018 -- here, not in a loader worker: a one-line error
        rows = table["row"].to_numpy().astype(np.int64)
        columns = (table[name].combine_chunks() for name in ("key", "source", "sha256"))
        return cls(Path(path), store.meta, rows, *columns, store.required_chunks(rows))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def chunk_of(self) -> np.ndarray:
        """(N,) the Zarr chunk holding each sample's features."""
        return self.rows // self.meta.chunk_size

    def records(self, ids: np.ndarray) -> list[dict]:
        """Manifest records (source, key, row, sha256) of samples `ids`, for CropReader."""
        keys, sources, hashes = (column.take(ids).to_pylist() for column in (self.keys, self.sources, self.hashes))
        return [
            {"source": s, "key": k, "row": int(r), "sha256": h}
            for s, k, r, h in zip(sources, keys, self.rows[ids], hashes)
        ]

    def identity(self) -> dict:
        """What a checkpoint records of the store it was trained on."""
        return {
            "path": str(self.path.resolve()),
            "teacher": dict(self.meta.teacher),
            "rows": len(self),
            "grids": list(self.meta.grids),
            "crop_size": int(self.meta.preprocessing["crop_size"]),
            "embed_dim": int(self.meta.embed_dim),
            "preprocessing": dict(self.meta.preprocessing),
        }


def check_store(samples: StoreSamples, model: ModelConfig, loss: LossConfig, resize: bool) -> None:
    """UserError when the store's teacher dim, crop size or grids do not fit the configuration."""
    meta, path = samples.meta, samples.path
    teacher = meta.teacher.get("model", "?")
    if meta.embed_dim != model.teacher_dim:
        raise UserError(
            f"store '{path}' holds {meta.embed_dim}-dim features (teacher {teacher}) but the model's "
            f"teacher_dim is {model.teacher_dim}: set model.teacher_dim={meta.embed_dim} or use a matching store"
        )
    crop_size = int(meta.preprocessing["crop_size"])
    if crop_size != model.image_size and not resize:
        raise UserError(
            f"store '{path}' holds {crop_size}px crops but the model's image_size is {model.image_size}: "
            f"set model.image_size={crop_size}, or data.resize=true to resize the crops on the device"
        )
    missing = sorted({*loss.grids, *loss.distillation_grids} - set(meta.grids))
    if missing:
        raise UserError(
            f"store '{path}' holds grids {list(meta.grids)}; the loss asks for grids {missing}: "
            f"set loss.grids to a subset of the store's grids"
        )


class StoreBatches(Dataset):
    """This process's device batches: item j is a Batch of `plan.batch` samples (see trainer.sampling).

    The Zarr array and the image sources are opened lazily in each process that reads, so the dataset
    can be handed to DataLoader workers under any start method.
    """

    def __init__(self, samples: StoreSamples, plan: BatchPlan, window: int, seed: int):
        self.samples = samples
        self.plan = plan
        self.order = SampleOrder(samples.chunk_of, window, seed)
        # the store's own crops when it keeps them
        self.reader = CropReader(samples.meta, samples.path, samples.required.get(CROPS, set()))
        self.chunk_size = samples.meta.chunk_size
        self.cache_size = 2 * window
        self._features: zarr.Array | None = None
        self._pid: int | None = None
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getitem__(self, j: int) -> Batch:
        ids = self.order.positions(self.plan.start(j), self.plan.batch)  # (B,) sample ids
        rows = self.samples.rows[ids]
        features = np.stack([self.chunk(int(row) // self.chunk_size)[int(row) % self.chunk_size] for row in rows])
        crops = self.reader.crops(self.samples.records(ids))
        return Batch(torch.from_numpy(crops), torch.from_numpy(features), torch.from_numpy(rows))

    def chunk(self, index: int) -> np.ndarray:
        """(chunk_size, V, D) float16 rows of chunk `index`, from the cache or one Zarr read."""
        if self._pid != os.getpid():
            self._features = FeatureStore.open(self.samples.path).features
            self._pid = os.getpid()
            self._chunks.clear()
        if index in self._chunks:
            self._chunks.move_to_end(index)
        else:
            self._chunks[index] = self.read_chunk(index)
            if len(self._chunks) > self.cache_size:
                self._chunks.popitem(last=False)
        return self._chunks[index]

    def read_chunk(self, index: int) -> np.ndarray:
        start = index * self.chunk_size
        rows = np.array([start, start + self.chunk_size - 1])
        read = partial(self._features.__getitem__, slice(start, start + self.chunk_size))
        return checked_read(self.samples.path, FEATURES, self._features, self.samples.required[FEATURES], rows, read)


def make_loader(dataset: StoreBatches, first: int, last: int, workers: int, prefetch: int, pin: bool) -> DataLoader:
    """Device batches first..last-1 of `dataset`, in order, prepared by `workers` processes."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=range(first, last),
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=prefetch if workers else None,
        worker_init_fn=ignore_stop_signals,
    )


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave a scheduler's stop signal to the training process, which checkpoints first
    (they exit with it; see trainer.preemption)."""
    from zeroseg.trainer.preemption import STOP_SIGNALS

    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


class ModelInput:
    """uint8 crops (B, S, S, 3) on the device -> (B, 3, H, W) float32 images normalised with the store's
    mean/std, resized (bicubic, antialiased) to the model's image_size when S differs."""

    def __init__(self, meta: StoreMeta, image_size: int, device: torch.device):
        self.mean = channel_stats(meta.preprocessing["mean"], device)
        self.std = channel_stats(meta.preprocessing["std"], device)
        self.image_size = image_size

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        images = crops.permute(0, 3, 1, 2).float()  # (B, 3, S, S), 0..255
        return to_model_input(images, self.image_size, self.mean, self.std)
