"""Stage-one throughput: bare teacher forward vs end-to-end `zs-cache build`, in one run.

Both sides use the same teacher, device, batch size and images (the fixture photos, copied until
there are --images of them). The bare side times only the tower over the 30 pre-made views of
each image; the end-to-end side runs the whole build (read, decode, crop, views, tower, compress,
commit). Prints both rates and their ratio (target >= 0.90).

    python benchmarks/cache_throughput.py --teacher ViT-B-32 --images 32 --batch-size 8     # CPU
    python benchmarks/cache_throughput.py --teacher ViT-L-14 --images 2048 --batch-size 64  # GPU
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from zeroseg.pipeline.build import run_build
from zeroseg.pipeline.build_options import BuildOptions
from zeroseg.pipeline.crops import crop_from_bytes, grid_views
from zeroseg.pipeline.runtime import resolve_device
from zeroseg.pipeline.teacher import Teacher, resolve_identity

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
GRIDS = [1, 2, 3, 4]


def sample_folder(root: Path, count: int) -> Path:
    photos = sorted(FIXTURES.glob("VOCdevkit/VOC2012/JPEGImages/*.jpg")) + sorted(FIXTURES.glob("coco/*/*.jpg"))
    folder = root / "images"
    for i in range(count):
        target = folder / f"{i // 100:03d}" / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos[i % len(photos)], target)
    return folder


def bare_forward_rate(teacher: Teacher, folder: Path, batch_size: int, image_size: int) -> float:
    """Images/s of the tower alone over pre-made views (no decode, no views, no writes timed)."""
    crops = np.stack([crop_from_bytes(p.read_bytes(), image_size)[0] for p in sorted(folder.rglob("*.jpg"))])
    batches = []
    for start in range(0, len(crops), batch_size):
        chunk = torch.from_numpy(crops[start : start + batch_size]).to(teacher.device)
        views = grid_views(chunk, GRIDS, teacher.view_size, teacher.mean, teacher.std)  # (B, 30, 3, T, T)
        batches.append(views.flatten(0, 1))
    teacher.encode_views(batches[0][:batch_size])  # warm-up
    sync(teacher.device)
    started = time.perf_counter()
    for views in batches:
        teacher.encode_views(views)
    sync(teacher.device)
    return len(crops) / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        folder = sample_folder(Path(tmp), args.images)
        device = resolve_device(args.device)
        teacher = Teacher(resolve_identity(args.teacher, args.pretrained), device, compile=args.compile)
        bare = bare_forward_rate(teacher, folder, args.batch_size, args.image_size)
        del teacher
        opts = BuildOptions(
            source=str(folder), store=str(Path(tmp) / "store"), grids=GRIDS, teacher=args.teacher,
            pretrained=args.pretrained, batch_size=args.batch_size, device=args.device,
            image_size=args.image_size, compile=args.compile, progress=False,
            shard_size=max(args.batch_size, 64) * 4, chunk_size=max(args.batch_size, 64),
        )
        started = time.perf_counter()
        summary = run_build(opts, log=lambda line: None)
        total = time.perf_counter() - started
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"device: {device_name}; teacher {args.teacher} pretrained={args.pretrained}; "
          f"{args.images} images x 30 views; batch {args.batch_size}")
    print(f"bare teacher forward:   {bare:8.2f} images/s")
    print(f"zs-cache build (loop):  {summary.images_per_second:8.2f} images/s")
    print(f"zs-cache build (total): {args.images / total:8.2f} images/s  (incl. model load and store setup)")
    print(f"ratio loop/bare:        {summary.images_per_second / bare:8.3f}  (target >= 0.90)")


if __name__ == "__main__":
    main()
