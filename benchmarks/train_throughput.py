"""Stage-two throughput: training steps fed from the feature store vs the same steps on batches in memory.

Both sides run `trainer.train.Trainer.train_step` (forward, the three losses, backward, AdamW) on the same
model, batch size and device, in alternating rounds. The store side takes its batches from one DataLoader
(Zarr chunk reads, stored crops or JPEG decode, in worker processes, pinned copies) whose workers live through
every round (their start and the first chunk reads fall in the untimed warm-up steps), so the rate is the
steady state of a long run; the memory side cycles four batches already on the device. Prints both rates,
images/s and their ratio (target >= 0.90), the fraction of the store side's time spent waiting for batches,
the model's FLOP per training image (FlopCounterMode, forward + backward) and, on CUDA, the peak memory and
the MFU against the GPU's dense bf16 peak (when its name is in PEAK_FLOPS).

Without --store it builds one from the sample photos (copied until there are --images of them) with the
tiny random-weight teacher, at --image-size, decoded as --decode says (`device`: built on --device, so that
the training steps decode and crop each batch's JPEGs on the device, the loader workers only reading them).
The student's teacher_dim is the store's (32 for the tiny teacher), so any --preset trains on it.

    python benchmarks/train_throughput.py --preset tiny --workers 1                          # CPU, seconds
    python benchmarks/train_throughput.py --store /data/zs-store --preset base --batch-size 256 \\
        --workers 12 --steps 100                                                             # one GPU
"""

import argparse
import itertools
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from zeroseg import process_group
from zeroseg.evaluation.samples import sample_photos
from zeroseg.pipeline.build import run_build
from zeroseg.pipeline.options import BuildOptions
from zeroseg.pipeline.store_reader import StoreReader
from zeroseg.trainer.config import build_config
from zeroseg.trainer.data import DeviceBatches, StoreBatches, check_store, make_loader
from zeroseg.trainer.train import Trainer

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s by device name


def fixture_store(root: Path, count: int, image_size: int, store_crops: bool, decode: str, device: str) -> Path:
    photos = sample_photos(tempfile.mkdtemp(prefix="zeroseg-samples-"))
    folder = root / "images"
    folder.mkdir()
    for i in range(count):
        shutil.copy(photos[i % len(photos)], folder / f"{i:06d}.jpg")
    opts = BuildOptions(
        source=str(folder), store=str(root / "store"), teacher="zs-tiny-clip",
        pretrained="none", device=device if decode == "device" else "cpu", batch_size=32, chunk_size=16,
        shard_size=64, image_size=image_size, progress=False, store_crops=store_crops, decode=decode,
    )  # fmt: skip
    run_build(opts, log=lambda line: None)
    return root / "store"


def timed_steps(trainer: Trainer, first_step: int, steps: int) -> tuple[float, float]:
    """(seconds, seconds spent waiting for batches) of `steps` optimizer steps, the device synchronised at the end
    (the steps themselves never wait for it)."""
    started, waited = time.perf_counter(), 0.0
    for step in range(first_step, first_step + steps):
        values, _, data_wait = trainer.train_step(step)
        waited += data_wait
    values.tolist()
    return time.perf_counter() - started, waited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="feature store (default: build one from the sample photos)")
    parser.add_argument("--images", type=int, default=160, help="images of the built store")
    parser.add_argument("--image-size", type=int, default=32, help="crop size of the built store")
    parser.add_argument("--store-crops", action="store_true", help="the built store keeps its crops (no JPEG decode)")
    parser.add_argument("--decode", default="full", help="decode of the built store: full, reduced or device")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, repeatable")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of store steps then in-memory steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps on each side first")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        store = args.store or fixture_store(
            Path(scratch), args.images, args.image_size, args.store_crops, args.decode, args.device
        )
        teacher_dim = StoreReader.open(store).meta.embed_dim
        cfg = build_config(
            {},
            [*args.overrides, "optim.lr=1e-4", "schedule.warmup_steps=0"],
            {"model.preset": args.preset, "data.store": str(store), "run.dir": scratch, "run.device": args.device,
             "data.batch_size": args.batch_size, "data.workers": args.workers, "schedule.steps": 10**6,
             "model.teacher_dim": teacher_dim},
        )  # fmt: skip
        samples = StoreReader.open(store)
        check_store(samples, cfg.model, cfg.loss, cfg.data.resize)
        process = process_group.setup(cfg.run.device)
        trainer = Trainer(cfg, process, samples, payload=None)
        dataset = StoreBatches(samples, trainer.plan, cfg.data.shuffle_window, cfg.run.seed)
        pin = process.device.type == "cuda"
        loader = make_loader(dataset, 0, 4 + args.warmup + args.rounds * args.steps, cfg.data.workers,
                             cfg.data.prefetch, pin)  # fmt: skip
        device = process.device
        store_batches = DeviceBatches(iter(loader), device, samples.meta.preprocessing.crop_size, samples.path)
        in_memory = itertools.cycle(list(itertools.islice(store_batches, 4)))  # on the device
        for batches in (store_batches, in_memory):  # warm-up (workers, chunk caches, allocator, kernels) untimed
            trainer.batches = batches
            timed_steps(trainer, 0, args.warmup)
        with FlopCounterMode(display=False) as flops:
            timed_steps(trainer, args.warmup, 1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        store_seconds = memory_seconds = waited = 0.0
        for _ in range(args.rounds):  # alternate, so a change in machine load hits both sides alike
            trainer.batches = store_batches
            seconds, data_wait = timed_steps(trainer, args.warmup, args.steps)
            store_seconds, waited = store_seconds + seconds, waited + data_wait
            trainer.batches = in_memory
            memory_seconds += timed_steps(trainer, args.warmup, args.steps)[0]
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        store_batches.close()

    batch = trainer.plan.effective_batch
    timed = args.rounds * args.steps
    store_rate, memory_rate = timed / store_seconds, timed / memory_seconds
    decode = samples.meta.preprocessing.decode
    crops = "stored" if samples.meta.stored_crops else f"decoded from the source ({decode} decode)"
    per_image = flops.get_total_flops() / batch
    print(
        f"device {process.device}, preset {args.preset}, batch {batch}, {args.workers} workers, "
        f"{len(samples)} images of {cfg.model.image_size}px, crops {crops}, {args.rounds} x {args.steps} timed steps"
    )
    print(f"fed from the store : {store_rate:8.2f} steps/s  {store_rate * batch:9.1f} images/s")
    print(f"batches in memory  : {memory_rate:8.2f} steps/s  {memory_rate * batch:9.1f} images/s")
    print(f"ratio store / memory: {store_rate / memory_rate:.3f} (target >= 0.90)")
    print(f"data wait: {waited / store_seconds:.3f} of the store side's time")
    print(f"model: {per_image / 1e9:.3g} GFLOP per training image (forward + backward, teacher_dim {teacher_dim})")
    if peak is not None:
        name = torch.cuda.get_device_name(device)
        print(f"peak memory: {peak / 2**30:.2f} GiB at batch {args.batch_size}")
        known = next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
        if known:
            print(f"MFU fed from the store: {store_rate * batch * per_image / known:.3f} "
                  f"(of {known / 1e12:.0f} TFLOP/s dense bf16, {name})")  # fmt: skip


if __name__ == "__main__":
    main()
