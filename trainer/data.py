"""Training batches from a feature store: the crops the teacher saw and its features, read chunk by chunk.

The store is read through its one door, pipeline.store_reader.StoreReader (the usable rows, each chunk's
features and crops or image records, with the integrity checks); this module is the torch side:
check_store   refuse, with one line, a store that does not fit the model and loss configuration
StoreBatches  map-style dataset: this process's device batch j -> Batch, in the order of trainer.sampling
make_loader   a DataLoader over device batches [first, last): worker processes, pinned memory
DeviceBatches the loader's batches on the device, each moved or decoded there while the step before trains
ModelInput    on the device: uint8 crops -> normalised float images of the model's input size

Each DataLoader worker keeps the last 2 x shuffle_window x accum_steps decompressed chunks (features, and the
crops of a store that keeps them, or else the chunk's image records from the manifest), so a worker reads each
chunk once per window it serves (one Zarr read of the chunk's rows per array) however many of its batches draw
from that chunk; trainer.sampling lays the batches out so that a worker serves whole runs of windows (each
chunk decompressed about once per epoch by one worker of one process). A store made with --store-crops gives
its own crops that way; otherwise the reader (StoreReader.source_crops) decodes the source images with the
build's decode and crop (the store's preprocessing `decode`, full or reduced); with decode "device" the workers
only read and parse them (Batch.encoded) and DeviceBatches decodes and crops them on the training device
(Batch.device_crops), a batch ahead of the training step.
"""

import os
import signal
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zeroseg.errors import UserError
from zeroseg.pipeline.crops import channel_stats, to_model_input
from zeroseg.pipeline.store_reader import CROPS, FEATURES, EncodedBatch, StoreMeta, StoreReader, decode_crops
from zeroseg.trainer.losses import LossConfig
from zeroseg.trainer.model_config import ModelConfig
from zeroseg.trainer.sampling import BatchPlan, SampleOrder


class Batch(NamedTuple):
    crops: torch.Tensor | None  # (B, S, S, 3) uint8, the centre crops the teacher saw; None: `encoded` holds them
    features: torch.Tensor  # (B, V, D) float16, the teacher's features of the V stored views
    rows: torch.Tensor  # (B,) int64, the store rows
    encoded: EncodedBatch | None = None  # a decode "device" store without crops: the images, parsed on the CPU

    def device_crops(self, device: torch.device, crop_size: int, store: Path) -> torch.Tensor:
        """(B, S, S, 3) uint8 crops on `device`: moved there, or decoded there as stage one did on this device type
        (pipeline.device_decode); an image the decoder rejects now is a UserError naming its row."""
        if self.encoded is None:
            return self.crops.to(device, non_blocking=True)
        crops, errors = decode_crops(self.encoded, crop_size, device)
        failed = next((i for i, error in enumerate(errors) if error is not None), None)
        if failed is not None:
            raise UserError(f"store '{store}': row {int(self.rows[failed])} no longer decodes on {device.type} "
                            f"({errors[failed]}): cache the images into a new store")
        return crops


def check_store(samples: StoreReader, model: ModelConfig, loss: LossConfig, resize: bool) -> None:
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

    The store's arrays and image sources are opened lazily in each process that reads (StoreReader.store), so the
    dataset can be handed to DataLoader workers under any start method.
    """

    def __init__(self, samples: StoreReader, plan: BatchPlan, window: int, seed: int):
        self.samples = samples
        self.plan = plan
        self.order = SampleOrder(samples.chunk_of, window, seed)
        self.chunk_size = samples.meta.chunk_size
        self.cache_size = 2 * window * plan.accum  # a window and the next for each of the accum runs it reads
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
        features = torch.from_numpy(out[FEATURES])
        if CROPS in out:
            return Batch(torch.from_numpy(out[CROPS]), features, torch.from_numpy(rows))
        crops = self.samples.source_crops(out)
        if isinstance(crops, EncodedBatch):  # decode "device": the training step decodes and crops them there
            return Batch(None, features, torch.from_numpy(rows), crops)
        return Batch(torch.from_numpy(crops), features, torch.from_numpy(rows))

    def chunk(self, index: int) -> dict[str, np.ndarray]:
        """Chunk `index` as StoreReader.read_chunk gives it: the features (chunk_size, V, D) and the stored crops
        (chunk_size, S, S, 3), or its samples' image records; from this process's cache or one read."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._chunks.clear()
        if index in self._chunks:
            self._chunks.move_to_end(index)
        else:
            self._chunks[index] = self.samples.read_chunk(index)
            if len(self._chunks) > self.cache_size:
                self._chunks.popitem(last=False)
        return self._chunks[index]


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
    (they exit with it; see zeroseg.process_group.StopRequest)."""
    from zeroseg.process_group import STOP_SIGNALS

    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


class DeviceBatches:
    """Batches with their crops and features on `device`, each made while the step before trains: one thread
    takes batch k+1 from the loader and moves it (or decodes it, Batch.device_crops) on a side CUDA stream while
    the training step runs batch k; the step's stream waits for that work on the device (an event), never the
    host. On the CPU the thread does the same work without streams."""

    def __init__(self, batches: Iterator[Batch], device: torch.device, crop_size: int, store: Path):
        self.batches, self.device, self.crop_size, self.store = batches, device, crop_size, store
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="zs-device-batches")
        self.ahead = self.thread.submit(self.prepare)

    def prepare(self) -> tuple[Batch, torch.cuda.Event | None] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        if self.stream is None:
            return Batch(batch.device_crops(self.device, self.crop_size, self.store), batch.features, batch.rows), None
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):  # this thread's device is cuda:0 else
            crops = batch.device_crops(self.device, self.crop_size, self.store)  # (B, S, S, 3) uint8
            features = batch.features.to(self.device, non_blocking=True)  # (B, V, D), from pinned memory
            return Batch(crops, features, batch.rows), self.stream.record_event()

    def __iter__(self) -> "DeviceBatches":
        return self

    def __next__(self) -> Batch:
        prepared = self.ahead.result()
        if prepared is None:
            raise StopIteration
        self.ahead = self.thread.submit(self.prepare)
        batch, done = prepared
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            batch.crops.record_stream(stream)  # their memory is not reused before the step's work on them is done
            batch.features.record_stream(stream)
        return batch

    def close(self) -> None:
        """Wait for the batch being made, then end the thread."""
        self.thread.shutdown(wait=True, cancel_futures=True)


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
