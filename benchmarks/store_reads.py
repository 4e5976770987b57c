"""Stored-crop reads in the trainer: images per CPU-second (= per core) in the real sampling order.

Synthesises a store that keeps its crops (--rows rows of the fixture photos' centre crops at --crop-size,
fp16 features of --views x --dim random values, chunks of --chunk-size images), then reads one epoch of
device batches of --batch-size in trainer.sampling's order, in this one process, three ways:

  dataset     trainer.data.StoreBatches (what a loader worker runs: each chunk decompressed once per window)
  per batch   the crops of each batch by one orthogonal Zarr read of its rows (CropReader.crops), the
              way batches were read before the chunk cache held crops; features from the chunk cache
  chunks      every chunk of both arrays read whole, once, in row order (the ceiling)

Prints images per CPU-second and wall-second of each, and dataset / per batch (target >= 4,000 images/s
per core at batch 256 for the dataset).

    python benchmarks/store_reads.py                         # 2,048 rows of 224 px, batch 256
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from zeroseg.pipeline.crops import crop_from_bytes
from zeroseg.pipeline.manifest import ImageRecord
from zeroseg.pipeline.reader import CropReader
from zeroseg.pipeline.sources import SourceSpec
from zeroseg.pipeline.store import FeatureStore
from zeroseg.pipeline.store_meta import Preprocessing, StoreMeta
from zeroseg.pipeline.teacher_identity import TeacherIdentity
from zeroseg.trainer.data import StoreBatches, StoreSamples
from zeroseg.trainer.sampling import BatchPlan

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def synthesise(path: Path, rows: int, crop_size: int, chunk_size: int, views: int, dim: int) -> None:
    from zeroseg.pipeline.manifest import manifest_rows

    photos = sorted(FIXTURES.glob("VOCdevkit/VOC2012/JPEGImages/*.jpg")) + sorted(FIXTURES.glob("coco/*/*.jpg"))
    crops = np.stack([crop_from_bytes(p.read_bytes(), crop_size)[0] for p in photos])  # (P, S, S, 3)
    meta = StoreMeta(
        teacher=TeacherIdentity("synthetic", None, None, False),
        preprocessing=Preprocessing.of(crop_size, crop_size, [0.5] * 3, [0.5] * 3),
        grids=[1], views=[[1, 0, 0]] * views, embed_dim=dim, shard_size=chunk_size * 16, chunk_size=chunk_size,
        stored_crops=True, sources={"synthetic": SourceSpec("folder", str(path))},
    )  # fmt: skip
    store = FeatureStore.create(path / "store", meta)
    rng = np.random.default_rng(0)
    shards = -(-rows // meta.shard_size)
    store.reserve(shards - 1, rows - (shards - 1) * meta.shard_size)
    for shard in range(shards):
        first = shard * meta.shard_size
        count = min(meta.shard_size, rows - first)
        features = rng.standard_normal((count, views, dim)).astype(np.float16)
        record = store.write_shard(shard, features, crops[(first + np.arange(count)) % len(crops)])
        records = [ImageRecord("synthetic", f"{first + i:08d}", first + i, None, crop_size, crop_size)
                   for i in range(count)]  # fmt: skip
        store.commit(shard, manifest_rows(shard, records), record)


def rate(read, images: int) -> tuple[float, float]:
    """(images per CPU-second, images per wall-second) of `read()`."""
    cpu, wall = time.process_time(), time.perf_counter()
    read()
    return images / (time.process_time() - cpu), images / (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--views", type=int, default=30)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--window", type=int, default=16, help="shuffle window (chunks)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        synthesise(Path(scratch), args.rows, args.crop_size, args.chunk_size, args.views, args.dim)
        path = Path(scratch) / "store"
        samples = StoreSamples.open(path)
        batches = len(samples) // args.batch_size
        images = batches * args.batch_size

        def dataset() -> None:
            reader = StoreBatches(samples, BatchPlan(args.batch_size, 1, 1, 0), args.window, seed=0)
            for j in range(batches):
                reader[j]

        def per_batch() -> None:
            reader = StoreBatches(samples, BatchPlan(args.batch_size, 1, 1, 0), args.window, seed=0)
            reader.arrays = ("features",)
            crops = CropReader(samples.meta, path)
            for j in range(batches):
                ids = reader.order.positions(reader.plan.start(j), args.batch_size)
                rows = samples.rows[ids]
                np.stack([reader.chunk(int(r) // args.chunk_size)["features"][int(r) % args.chunk_size] for r in rows])
                crops.crops([ImageRecord("synthetic", f"{r:08d}", int(r)) for r in rows])

        def chunks() -> None:
            store = FeatureStore.open(path)
            for start in range(0, images, args.chunk_size):
                store.features[start : start + args.chunk_size], store.crops[start : start + args.chunk_size]

        results = {name: rate(read, images) for name, read in (("dataset", dataset), ("per batch", per_batch),
                                                               ("chunks", chunks))}  # fmt: skip
    print(f"{images} images of {args.crop_size} px with {args.views}x{args.dim} features, batch {args.batch_size}, "
          f"window {args.window} x chunk {args.chunk_size}")  # fmt: skip
    for name, (per_cpu, per_wall) in results.items():
        print(f"{name:<10} {per_cpu:9.0f} images/CPU-s  {per_wall:9.0f} images/s")
    print(f"dataset / per batch: {results['dataset'][0] / results['per batch'][0]:.2f} (per CPU-second; "
          f"target: dataset >= 4000 images/CPU-s)")


if __name__ == "__main__":
    main()
