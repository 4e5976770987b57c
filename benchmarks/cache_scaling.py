"""Stage one on Dask: images/s of `zs-cache build` with 1 worker and with --threads workers, same total threads.

Teacher ViT-B-32 with random weights (no download), on the CPU. Both sides get --threads torch threads in
all: one worker with --threads threads, or --threads workers with one thread each, so the ratio measures how
well the build spreads over workers (scheduling, per-task overhead, commits), not how many cores it gets.
Shards of --shard-size images (default 64: large enough that per-task costs are paid as in a real build).
Each worker builds its teacher before the clock starts; the figure is the build's own images/s over its
encoding phase (scheduling, decode, teacher, writes and commits). Target: >= 0.9.

    python benchmarks/cache_scaling.py [--images 256] [--threads 2] [--grids 1,2,3,4]
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from distributed import Client, LocalCluster

from zeroseg.evaluation.samples import sample_photos
from zeroseg.pipeline.build import run_build
from zeroseg.pipeline.dask_build import TASKS_PER_WORKER, TeacherSpec, describe_teacher_on_worker
from zeroseg.pipeline.options import BuildOptions
from zeroseg.pipeline.teacher import resolve_identity

TEACHER = "ViT-B-32"


def make_images(root: Path, count: int) -> Path:
    """`count` images cycled from the sample photos (VOC and COCO samples), each under its own name."""
    photos = sample_photos(tempfile.mkdtemp(prefix="zeroseg-samples-"))
    folder = root / "images"
    folder.mkdir()
    for i in range(count):
        shutil.copy(photos[i % len(photos)], folder / f"{i:04d}-{photos[i % len(photos)].name}")
    return folder


def images_per_second(workers: int, threads: int, images: Path, store: Path, grids: list[int], shard: int) -> float:
    """The build's images/s on `workers` local workers of `threads` torch threads each."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with LocalCluster(n_workers=workers, threads_per_worker=TASKS_PER_WORKER, processes=True, dashboard_address=":0",
                      env=env) as cluster:  # fmt: skip
        with Client(cluster) as client:
            client.wait_for_workers(workers)
            teacher = TeacherSpec(resolve_identity(TEACHER, "none"), "cpu")
            client.run(describe_teacher_on_worker, teacher)  # every worker builds its teacher before the clock
            summary = run_build(
                BuildOptions(
                    source=str(images), store=str(store), grids=grids, teacher=TEACHER, pretrained="none",
                    device="cpu", shard_size=shard, chunk_size=min(shard, 64), batch_size=min(shard, 32),
                    decode_threads=threads, progress=False, scheduler=cluster.scheduler_address, compile=False,
                ),
                log=lambda line: None,
            )
    return summary.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all, on each side")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--grids", default="1,2,3,4")
    args = parser.parse_args()
    grids = [int(g) for g in args.grids.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp), args.images)
        one = images_per_second(1, args.threads, images, Path(tmp) / "store-1", grids, args.shard_size)
        many = images_per_second(args.threads, 1, images, Path(tmp) / "store-n", grids, args.shard_size)
    print(f"{TEACHER} (random weights), grids {args.grids}, {args.images} images in shards of {args.shard_size}, "
          f"CPU, {args.threads} torch threads on each side")
    print(f"1 worker x {args.threads} threads : {one:.2f} images/s")
    print(f"{args.threads} workers x 1 thread : {many:.2f} images/s")
    print(f"ratio              : {many / one:.2f} (target >= 0.9: same threads, spread over workers)")


if __name__ == "__main__":
    main()
