"""Stored-crop reads in the trainer: chunk decompressions per epoch and images per CPU-second (= per core) in the
real worker/rank order.

Synthesises a store that keeps its crops (--rows rows of the sample photos' centre crops at --crop-size,
fp16 features of the views of --grids x --dim random values, chunks of --chunk-size images), then reads the steps of one
epoch of device batches of --batch-size the way --ranks training processes with --workers DataLoader workers
each read them: reader (rank r, worker w) is a fresh trainer.data.StoreBatches (its own chunk cache, as in a
worker process) reading the rank's device batches j with j % workers == w, in order. Three ways, in this one
process:

  plain       the batch layout before trainer.sampling's runs (BatchPlan without streams: the plain order)
  laid out    BatchPlan.reading, the layout `zs-train` uses (each worker reads whole runs of windows)
  chunks      every chunk of both arrays read whole, once, in row order (the ceiling)

Prints chunk decompressions (reads of one chunk of every array) per epoch and images per CPU-second and
wall-second of each, then the decompressions of an ImageNet-sized epoch (1,281,167 samples in chunks of 64,
--ranks x --workers readers, --batch-size, --window), counted on the sample ids alone (no store).

    python benchmarks/store_reads.py                         # 4,096 rows of 224 px, 2 ranks x 4 workers
"""

import argparse
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from zeroseg.evaluation.samples import sample_photos
from zeroseg.pipeline.crops import crop_from_bytes
from zeroseg.pipeline.manifest import ImageRecord
from zeroseg.pipeline.sources import SourceSpec
from zeroseg.pipeline.store import FeatureStore
from zeroseg.pipeline.store_meta import Preprocessing, StoreMeta
from zeroseg.pipeline.store_reader import StoreReader
from zeroseg.pipeline.teacher_identity import TeacherIdentity
from zeroseg.trainer.data import StoreBatches
from zeroseg.trainer.sampling import BatchPlan, SampleOrder


def synthesise(path: Path, rows: int, crop_size: int, chunk_size: int, grids: list[int], dim: int) -> None:
    from zeroseg.pipeline.manifest import manifest_rows

    photos = sample_photos(tempfile.mkdtemp(prefix="zeroseg-samples-"))
    crops = np.stack([crop_from_bytes(p.read_bytes(), crop_size)[0] for p in photos])  # (P, S, S, 3)
    meta = StoreMeta(
        teacher=TeacherIdentity("synthetic", None, None, False),
        preprocessing=Preprocessing.of(crop_size, crop_size, [0.5] * 3, [0.5] * 3),
        grids=grids, embed_dim=dim, shard_size=chunk_size * 16, chunk_size=chunk_size,
        stored_crops=True, sources={"synthetic": SourceSpec("folder", str(path))},
    )  # fmt: skip
    store = FeatureStore.create(path / "store", meta)
    rng = np.random.default_rng(0)
    shards = -(-rows // meta.shard_size)
    store.reserve(shards - 1, rows - (shards - 1) * meta.shard_size)
    for shard in range(shards):
        first = shard * meta.shard_size
        count = min(meta.shard_size, rows - first)
        features = rng.standard_normal((count, meta.num_views, dim)).astype(np.float16)
        record = store.write_shard(shard, features, crops[(first + np.arange(count)) % len(crops)])
        records = [ImageRecord("synthetic", f"{first + i:08d}", first + i, None, crop_size, crop_size)
                   for i in range(count)]  # fmt: skip
        store.commit(shard, manifest_rows(shard, records), record)


def plans(args, samples: int, laid_out: bool) -> list[BatchPlan]:
    """Each rank's BatchPlan: laid out for the workers (BatchPlan.reading) or the plain order."""
    if laid_out:
        window = args.window * args.chunk_size
        return [BatchPlan.reading(args.batch_size, 1, args.ranks, r, args.workers, samples, window)
                for r in range(args.ranks)]  # fmt: skip
    return [BatchPlan(args.batch_size, 1, args.ranks, r) for r in range(args.ranks)]


def reader_batches(plan: BatchPlan, workers: int, steps: int) -> list[list[int]]:
    """The device batches each loader worker of `plan`'s rank reads in `steps` steps, in order."""
    return [list(range(w, steps, max(1, workers))) for w in range(max(1, workers))]


def simulated_reads(args, samples: int, laid_out: bool) -> int:
    """Chunk decompressions of one epoch of `samples` in chunks of 64, each reader an LRU cache of
    StoreBatches' size, on the sample ids alone."""
    order = SampleOrder(np.arange(samples) // args.chunk_size, args.window, seed=0)
    steps = samples // (args.batch_size * args.ranks)
    reads = 0
    for plan in plans(args, samples, laid_out):
        for batches in reader_batches(plan, args.workers, steps):
            cache: OrderedDict[int, None] = OrderedDict()
            for j in batches:
                for chunk in np.unique(order.positions(plan.start(j), plan.batch) // args.chunk_size).tolist():
                    if chunk in cache:
                        cache.move_to_end(chunk)
                        continue
                    reads += 1
                    cache[chunk] = None
                    if len(cache) > 2 * args.window:
                        cache.popitem(last=False)
    return reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--grids", type=lambda text: [int(g) for g in text.split(",")], default=[1, 2, 3, 4],
                        help="grids of the synthetic features' views (default 1,2,3,4: 30 views)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--window", type=int, default=4, help="shuffle window (chunks)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4, help="loader workers per rank")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        synthesise(Path(scratch), args.rows, args.crop_size, args.chunk_size, args.grids, args.dim)
        path = Path(scratch) / "store"
        samples = StoreReader.open(path)
        steps = len(samples) // (args.batch_size * args.ranks)  # one epoch of steps
        images = steps * args.batch_size * args.ranks
        for name, laid_out in (("plain", False), ("laid out", True)):
            reads = 0
            cpu, wall = time.process_time(), time.perf_counter()
            for plan in plans(args, len(samples), laid_out):
                for batches in reader_batches(plan, args.workers, steps):
                    reader = StoreBatches(samples, plan, args.window, seed=0)
                    read, counted = reader.read_chunk, []
                    reader.read_chunk = lambda index: counted.append(index) or read(index)  # noqa: B023
                    for j in batches:
                        reader[j]
                    reads += len(counted)
            results[name] = reads, images / (time.process_time() - cpu), images / (time.perf_counter() - wall)
        store = FeatureStore.open(path)
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, images, args.chunk_size):
            store.features[start : start + args.chunk_size], store.crops[start : start + args.chunk_size]
        chunks = -(-images // args.chunk_size)
        results["chunks"] = chunks, images / (time.process_time() - cpu), images / (time.perf_counter() - wall)
    print(f"{images} images ({chunks} chunks) of {args.crop_size} px with {samples.meta.num_views}x{args.dim} "
          f"features, "
          f"{args.ranks} ranks x {args.workers} workers, batch {args.batch_size}, window {args.window} x chunk "
          f"{args.chunk_size}")  # fmt: skip
    for name, (reads, per_cpu, per_wall) in results.items():
        print(f"{name:<9} {reads:7d} chunk reads per epoch  {per_cpu:7.0f} images/CPU-s  {per_wall:7.0f} images/s")
    imagenet = 1_281_167
    plain, laid_out = simulated_reads(args, imagenet, False), simulated_reads(args, imagenet, True)
    print(f"ImageNet-sized epoch ({-(-imagenet // args.chunk_size)} chunks), same readers: {plain} chunk reads "
          f"plain, {laid_out} laid out")


if __name__ == "__main__":
    main()
