"""Stage one on Dask: images/s of `zs-cache build` with 1 and with 2 local workers on the same images.

Teacher ViT-B-32 with random weights (no download), on the CPU, one torch thread per worker (Dask's
worker processes start with OMP_NUM_THREADS=1). Each worker builds its teacher before the clock starts;
the figure is the build's own images/s over its encoding phase (scheduling, decode, teacher, writes and
commits). Target: 2 workers >= 1.7x one worker on 2 cores.

    python benchmarks/cache_scaling.py [--images 24] [--grids 1,2,3,4]
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from distributed import Client, LocalCluster

from zeroseg.pipeline.build import run_build
from zeroseg.pipeline.build_options import BuildOptions
from zeroseg.pipeline.dask_build import TeacherSpec, describe_teacher_on_worker
from zeroseg.pipeline.teacher import resolve_identity

PHOTOS_ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
TEACHER = "ViT-B-32"


def make_images(root: Path, count: int) -> Path:
    """`count` images cycled from the fixture photos (VOC and COCO samples), each under its own name."""
    photos = sorted(PHOTOS_ROOT.glob("VOCdevkit/VOC2012/JPEGImages/*.jpg")) + sorted(PHOTOS_ROOT.glob("coco/*/*.jpg"))
    folder = root / "images"
    folder.mkdir()
    for i in range(count):
        shutil.copy(photos[i % len(photos)], folder / f"{i:04d}-{photos[i % len(photos)].name}")
    return folder


def images_per_second(workers: int, images: Path, store: Path, grids: list[int]) -> float:
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(workers)
            teacher = TeacherSpec(resolve_identity(TEACHER, "none"), "cpu")
            client.run(describe_teacher_on_worker, teacher)  # every worker builds its teacher before the clock
            summary = run_build(
                BuildOptions(
                    source=str(images), store=str(store), grids=grids, teacher=TEACHER, pretrained="none",
                    device="cpu", shard_size=2, chunk_size=2, batch_size=2, decode_threads=1, progress=False,
                    scheduler=cluster.scheduler_address,
                ),
                log=lambda line: None,
            )
    return summary.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--grids", default="1,2,3,4")
    args = parser.parse_args()
    grids = [int(g) for g in args.grids.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(Path(tmp), args.images)
        one = images_per_second(1, images, Path(tmp) / "store-1", grids)
        two = images_per_second(2, images, Path(tmp) / "store-2", grids)
    print(f"{TEACHER} (random weights), grids {args.grids}, {args.images} images, CPU, 1 torch thread per worker")
    print(f"1 worker : {one:.2f} images/s")
    print(f"2 workers: {two:.2f} images/s")
    print(f"ratio    : {two / one:.2f}x (target >= 1.7x on 2 cores)")


if __name__ == "__main__":
    main()
