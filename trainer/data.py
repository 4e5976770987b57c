"""Training batches from a feature store: the crops the teacher saw and its features, read chunk by chunk.

StoreSamples  the usable (status ok) rows of a store, their image keys, and the store's identity
check_store   refuse, with one line, a store that does not fit the model and loss configuration
StoreBatches  map-style dataset: this process's device batch j -> Batch, in the order of trainer.sampling
make_loader   a DataLoader over device batches [first, last): worker processes, pinned memory
ModelInput    on the device: uint8 crops -> normalised float images of the model's input size

Each DataLoader worker keeps the last 2 x shuffle_window decompressed chunks (features, and the crops of a
store that keeps them), so a worker reads each chunk once per window it serves (one Zarr read of the chunk's
rows per array) however many of its batches draw from that chunk. A store made with --store-crops gives its
own crops that way; otherwise pipeline.reader.CropReader decodes the source images with the build's decode
and crop (the store's preprocessing `decode`, full or reduced).
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
from zeroseg.pipeline.manifest import ImageRecord
from zeroseg.pipeline.reader import CropReader
from zeroseg.pipeline.store import CROPS, FEATURES, FeatureStore
from zeroseg.pipeline.store_meta import StoreMeta
from zeroseg.trainer.losses import LossConfig
from zeroseg.trainer.model_config import ModelConfig
from zeroseg.trainer.sampling import BatchPlan, SampleOrder


class Batch(NamedTuple):
    crops: torch.Tensor  # (B, S, S, 3) uint8, the centre crops the teacher saw
    features: torch.Tensor  # (B, V, D) float16, the teacher's features of the V stored views
    rows: torch.Tensor  # (B,) int64, the store rows


@dataclass
class StoreSamples:
    """The usable rows of a store in row order: sample i is feature row rows[i] of image (sources[i], keys[i]).

    The rows are a numpy array; keys, sources and hashes stay Arrow columns, one chunk per manifest part, a
    few tens of bytes per sample: the sources as dictionary codes, the hashes as 32 raw bytes. A store that
    keeps its crops is read from those alone, so its keys, sources and hashes are not loaded (None)."""

    path: Path
    meta: StoreMeta
    rows: np.ndarray  # (N,) int64, ascending
    keys: pa.ChunkedArray | None  # (N,) string
    sources: pa.ChunkedArray | None  # (N,) source names, dictionary-encoded
    hashes: pa.ChunkedArray | None  # (N,) 32-byte sha256 of each image's bytes (all zero: none recorded)
    required: dict[str, set[int]]  # array -> chunks whose files must exist (FeatureStore.required_chunks)
    starts: np.ndarray | None = None  # (chunks + 1,) first sample of each chunk of keys, sources and hashes

    @classmethod
    def open(cls, path: str | Path) -> "StoreSamples":
        store = FeatureStore.open(path)
        stored = store.meta.stored_crops
        columns = ["row", "status"] if stored else ["row", "key", "source", "sha256", "status"]
        table = store.manifest(columns, each=usable_rows)
        if table.num_rows == 0:
            raise UserError(f"store '{path}' has no usable images (no manifest row with status ok)")
        rows = table["row"].to_numpy().astype(np.int64)
        if np.any(rows[1:] <= rows[:-1]):  # parts come in shard order, so rows usually ascend already
            order = np.argsort(rows, kind="stable")
            table, rows = table.take(order).combine_chunks(), rows[order]  # one chunk per column
        required = store.required_chunks(rows)
        if stored:
            return cls(Path(path), store.meta, rows, None, None, None, required)
        CropReader(store.meta).sources  # noqa: B018 -- here, not in a loader worker: a one-line error
        table = table.unify_dictionaries()
        keys, sources, hashes = table["key"], table["source"], table["sha256"]  # a chunk per part, not copied
        starts = np.cumsum([0] + [len(chunk) for chunk in keys.chunks])  # the same chunks in all three columns
        return cls(Path(path), store.meta, rows, keys, sources, hashes, required, starts)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def chunk_of(self) -> np.ndarray:
        """(N,) the Zarr chunk holding each sample's features."""
        return self.rows // self.meta.chunk_size

    def records(self, ids: np.ndarray) -> list[ImageRecord]:
        """The image records (source, key, row, sha256) of samples `ids`, for CropReader."""
        columns = (self.keys, self.sources, self.hashes)
        keys, sources, digests = (chunked_values(column, self.starts, ids) for column in columns)
        hashes = [digest.hex() if any(digest) else None for digest in digests]
        return [ImageRecord(s, k, int(r), h) for s, k, r, h in zip(sources, keys, self.rows[ids], hashes)]

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


def chunked_values(column: pa.ChunkedArray, starts: np.ndarray, ids: np.ndarray) -> list:
    """column[ids] as Python values, taken from only the chunks that hold them (chunk i holds ids starts[i] to
    starts[i + 1] - 1): the samples of a batch lie in a few manifest parts, and ChunkedArray.take costs time in
    proportion to the whole column."""
    owner = np.searchsorted(starts, ids, side="right") - 1  # (B,) the chunk of each id
    order = np.argsort(owner, kind="stable")  # ids grouped by chunk, ascending
    values: list = []
    for index in np.unique(owner).tolist():
        local = ids[order][owner[order] == index] - starts[index]
        values += column.chunk(index).take(pa.array(local)).to_pylist()
    taken = [None] * len(ids)
    for position, value in zip(order.tolist(), values):
        taken[position] = value
    return taken


_HEX_VALUE = np.full(256, 0, dtype=np.uint8)
_HEX_VALUE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX_VALUE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
_IS_HEX = np.zeros(256, dtype=bool)
_IS_HEX[np.frombuffer(b"0123456789abcdefABCDEF", np.uint8)] = True


def usable_rows(part: pa.Table, path: Path) -> pa.Table:
    """Manifest part `path`'s ok rows without their status; a hex sha256 column becomes 32 raw bytes per row,
    a source column dictionary codes."""
    part = part.filter(pc.equal(part["status"], "ok")).drop_columns(["status"])
    if "source" in part.column_names:
        part = part.set_column(part.column_names.index("source"), "source", pc.dictionary_encode(part["source"]))
    if "sha256" in part.column_names:
        digests = pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), part.num_rows, [None, pa.py_buffer(
            sha256_bytes(part["sha256"], path))])  # fmt: skip
        part = part.set_column(part.column_names.index("sha256"), "sha256", digests)
    return part


def sha256_bytes(hexes: pa.ChunkedArray, path: Path) -> np.ndarray:
    """(N, 32) uint8 digests of N hex sha256 strings (a null becomes all zeros), decoded without Python objects."""
    if len(hexes) == 0:
        return np.zeros((0, 32), np.uint8)
    hexes = pc.fill_null(hexes, "0" * 64).combine_chunks().cast(pa.large_string())
    offsets = np.frombuffer(hexes.buffers()[1], np.int64)[hexes.offset : hexes.offset + len(hexes) + 1]
    text = np.frombuffer(hexes.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    if not np.all(np.diff(offsets) == 64) or not _IS_HEX[text].all():
        raise UserError(f"{path}: a sha256 in this manifest part is not 64 hex digits; the store is damaged")
    text = text.reshape(len(hexes), 32, 2)
    return (_HEX_VALUE[text[..., 0]] << 4) | _HEX_VALUE[text[..., 1]]


def check_store(samples: StoreSamples, model: ModelConfig, loss: LossConfig, resize: bool) -> None:
    """UserError when the store's teacher dim, crop size or grids do not fit the configuration."""
    meta, path = samples.meta, samples.path
    teacher = meta.teacher.model
    if meta.embed_dim != model.teacher_dim:
        raise UserError(
            f"store '{path}' holds {meta.embed_dim}-dim features (teacher {teacher}) but the model's "
            f"teacher_dim is {model.teacher_dim}: set model.teacher_dim={meta.embed_dim} or use a matching store"
        )
    crop_size = meta.preprocessing.crop_size
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
        self.reader = CropReader(samples.meta, samples.path)  # decodes the source images of a store without crops
        self.arrays = (FEATURES, CROPS) if self.reader.reads_stored_crops else (FEATURES,)
        self.chunk_size = samples.meta.chunk_size
        self.cache_size = 2 * window
        self._arrays: dict[str, zarr.Array] = {}
        self._pid: int | None = None
        self._chunks: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __getitem__(self, j: int) -> Batch:
        ids = self.order.positions(self.plan.start(j), self.plan.batch)  # (B,) sample ids
        rows = self.samples.rows[ids]
        chunk_of, offset = np.divmod(rows, self.chunk_size)  # (B,), (B,)
        by_chunk = np.argsort(chunk_of, kind="stable")  # (B,) batch positions grouped by chunk
        out: dict[str, np.ndarray] = {}
        for group in np.split(by_chunk, np.flatnonzero(np.diff(chunk_of[by_chunk])) + 1):
            for name, block in self.chunk(int(chunk_of[group[0]])).items():  # block: (chunk_size, ...) of one array
                if name not in out:
                    out[name] = np.empty((len(rows), *block.shape[1:]), dtype=block.dtype)
                out[name][group] = block[offset[group]]
        crops = out[CROPS] if CROPS in out else self.reader.crops(self.samples.records(ids))
        return Batch(torch.from_numpy(crops), torch.from_numpy(out[FEATURES]), torch.from_numpy(rows))

    def chunk(self, index: int) -> dict[str, np.ndarray]:
        """Chunk `index` of the features (chunk_size, V, D) and of the stored crops (chunk_size, S, S, 3)
        when read from the store, from the cache or one Zarr read each."""
        if self._pid != os.getpid():
            group = FeatureStore.open(self.samples.path).group
            self._arrays = {name: group[name] for name in self.arrays}
            self._pid = os.getpid()
            self._chunks.clear()
        if index in self._chunks:
            self._chunks.move_to_end(index)
        else:
            self._chunks[index] = self.read_chunk(index)
            if len(self._chunks) > self.cache_size:
                self._chunks.popitem(last=False)
        return self._chunks[index]

    def read_chunk(self, index: int) -> dict[str, np.ndarray]:
        start = index * self.chunk_size
        """Chunk `index` of each read array, one Zarr read each through pipeline.integrity.checked_read: a chunk
        file that must exist but is gone, or one failing its checksum, is a UserError naming it and its rows."""
        start = index * self.chunk_size
        chunks = {}
        for name, array in self._arrays.items():
            rows = np.array([start, min(start + self.chunk_size, array.shape[0]) - 1])  # the chunk's first, last row
            read = partial(array.__getitem__, slice(start, start + self.chunk_size))
            chunks[name] = checked_read(self.samples.path, name, array, self.samples.required[name], rows, read)
        return chunks


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
        self.mean = channel_stats(meta.preprocessing.mean, device)
        self.std = channel_stats(meta.preprocessing.std, device)
        self.image_size = image_size

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        images = crops.permute(0, 3, 1, 2).float()  # (B, 3, S, S), 0..255
        return to_model_input(images, self.image_size, self.mean, self.std)
