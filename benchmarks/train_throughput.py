"""Stage-two throughput: training steps fed from the feature store vs the same steps on batches in memory.

Both sides run `trainer.train.Trainer.train_step` (forward, the three losses, backward, AdamW) on the same
model, batch size and device, in alternating rounds. The store side takes its batches from the DataLoader
(Zarr chunk reads, stored crops or JPEG decode, in worker processes, pinned copies), from a new loader each
round, timed from its creation (worker start and empty chunk caches included, as at a run's start or resume);
the memory side cycles four batches already on the device. Prints both rates, images/s and their
ratio (target >= 0.90).

Without --store it builds one from the fixture photos (copied until there are --images of them) with the
tiny random-weight teacher, at --image-size, decoded as --decode says (`device`: built on --device, so that
the training steps decode and crop each batch's JPEGs on the device, the loader workers only reading them).

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

from zeroseg import process_group
from zeroseg.pipeline.build import run_build
from zeroseg.pipeline.options import BuildOptions
from zeroseg.trainer.config import build_config
from zeroseg.trainer.data import StoreBatches, StoreSamples, check_store, make_loader
from zeroseg.trainer.train import Trainer

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def fixture_store(root: Path, count: int, image_size: int, store_crops: bool, decode: str, device: str) -> Path:
    photos = sorted(FIXTURES.glob("VOCdevkit/VOC2012/JPEGImages/*.jpg")) + sorted(FIXTURES.glob("coco/*/*.jpg"))
    folder = root / "images"
    folder.mkdir()
    for i in range(count):
        shutil.copy(photos[i % len(photos)], folder / f"{i:06d}.jpg")
    opts = BuildOptions(
        source=str(folder), store=str(root / "store"), teacher=str(FIXTURES / "zs-tiny-clip.json"),
        pretrained="none", device=device if decode == "device" else "cpu", batch_size=32, chunk_size=16,
        shard_size=64, image_size=image_size, progress=False, store_crops=store_crops, decode=decode,
    )  # fmt: skip
    run_build(opts, log=lambda line: None)
    return root / "store"


def timed_steps(trainer: Trainer, first_step: int, steps: int) -> float:
    """Seconds for `steps` optimizer steps (the loss read-back in each step synchronises the device)."""
    started = time.perf_counter()
    for step in range(first_step, first_step + steps):
        trainer.train_step(step)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="feature store (default: build one from the fixture photos)")
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
        cfg = build_config(
            {},
            [*args.overrides, "optim.lr=1e-4", "schedule.warmup_steps=0"],
            {"model.preset": args.preset, "data.store": str(store), "run.dir": scratch, "run.device": args.device,
             "data.batch_size": args.batch_size, "data.workers": args.workers, "schedule.steps": 10**6},
        )  # fmt: skip
        samples = StoreSamples.open(store)
        check_store(samples, cfg.model, cfg.loss, cfg.data.resize)
        process = process_group.setup(cfg.run.device)
        trainer = Trainer(cfg, process, samples, payload=None)
        dataset = StoreBatches(samples, trainer.plan, cfg.data.shuffle_window, cfg.run.seed)
        pin = process.device.type == "cuda"

        def cold_loader(first: int, count: int):
            """A new loader (fresh worker processes, empty chunk caches) over device batches [first, first + count)."""
            return iter(make_loader(dataset, first, first + count, cfg.data.workers, cfg.data.prefetch, pin))

        crop_size, device = samples.meta.preprocessing.crop_size, process.device
        in_memory = itertools.cycle(
            [batch._replace(crops=batch.device_crops(device, crop_size, samples.path), encoded=None,
                            features=batch.features.to(device))
             for batch in itertools.islice(cold_loader(0, 4), 4)]
        )  # fmt: skip
        for batches in (cold_loader(0, args.warmup), in_memory):  # warm-up (allocator, kernels) untimed
            trainer.batches = batches
            timed_steps(trainer, 0, args.warmup)
        store_seconds = memory_seconds = 0.0
        for round_ in range(args.rounds):  # alternate, so a change in machine load hits both sides alike
            started = time.perf_counter()  # the store side pays its loader's start: each round begins cold
            trainer.batches = cold_loader(args.warmup + round_ * args.steps, args.steps)
            timed_steps(trainer, args.warmup, args.steps)
            store_seconds += time.perf_counter() - started
            trainer.batches = in_memory
            memory_seconds += timed_steps(trainer, args.warmup, args.steps)

    batch = trainer.plan.effective_batch
    timed = args.rounds * args.steps
    store_rate, memory_rate = timed / store_seconds, timed / memory_seconds
    decode = samples.meta.preprocessing.decode
    crops = "stored" if samples.meta.stored_crops else f"decoded from the source ({decode} decode)"
    print(
        f"device {process.device}, preset {args.preset}, batch {batch}, {args.workers} workers, "
        f"{len(samples)} images of {cfg.model.image_size}px, crops {crops}, {args.rounds} x {args.steps} timed steps"
    )
    print(f"fed from the store : {store_rate:8.2f} steps/s  {store_rate * batch:9.1f} images/s")
    print(f"batches in memory  : {memory_rate:8.2f} steps/s  {memory_rate * batch:9.1f} images/s")
    print(f"ratio store / memory: {store_rate / memory_rate:.3f} (target >= 0.90)")


if __name__ == "__main__":
    main()
