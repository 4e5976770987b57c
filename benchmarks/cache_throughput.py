"""Stage-one throughput: bare teacher forward vs end-to-end `zs-cache build`, in one run.

Both sides use the same teacher, device, batch size and images (the sample photos, copied until
there are --images of them). The bare side times only the tower over the 30 pre-made views of
each image; the end-to-end side runs the whole build (read, decode, crop, views, tower, compress,
commit). Prints both rates, their ratio (target >= 0.90) and the difference of their per-image times: the
pipeline's own cost per image that the build does not hide behind the tower (on a CPU, where both sides are
mostly teacher compute, the ratio says little and this is the number to read). With --compile both sides
compile outside their timing: the bare side in its warm-up forward, the build side in an untimed build of the
same batch shapes first (torch.compile's caches then serve the timed build's fresh teacher).

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

from zeroseg.evaluation.samples import sample_photos
from zeroseg.pipeline.build import run_build
from zeroseg.pipeline.crops import crop_from_bytes
from zeroseg.pipeline.options import BuildOptions
from zeroseg.pipeline.teacher import Teacher, resolve_identity
from zeroseg.runtime import resolve_device

GRIDS = [1, 2, 3, 4]


def sample_folder(root: Path, count: int) -> Path:
    photos = sample_photos(tempfile.mkdtemp(prefix="zeroseg-samples-"))
    folder = root / "images"
    for i in range(count):
        target = folder / f"{i // 100:03d}" / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photos[i % len(photos)], target)
    return folder


def bare_forward_rate(teacher: Teacher, folder: Path, batch_size: int, image_size: int) -> float:
    """Images/s of the tower alone (no decode, no views, no writes timed). The crops wait on the device as
    uint8 and each batch's views are made just before its timed forward, so memory holds one batch of views."""
    crops = np.stack([crop_from_bytes(p.read_bytes(), image_size)[0] for p in sorted(folder.rglob("*.jpg"))])
    batches = [torch.from_numpy(crops[start : start + batch_size]).to(teacher.device)
               for start in range(0, len(crops), batch_size)]  # fmt: skip
    teacher.encode_views(views_of(teacher, batches[0]))  # warm-up
    seconds = 0.0
    for batch in batches:
        views = views_of(teacher, batch)
        sync(teacher.device)
        started = time.perf_counter()
        teacher.encode_views(views)
        sync(teacher.device)
        seconds += time.perf_counter() - started
    return len(crops) / seconds


def views_of(teacher: Teacher, crops: torch.Tensor) -> torch.Tensor:
    """(B * 30, 3, T, T) normalised views, in the tower's dtype, of a batch of (B, S, S, 3) uint8 crops."""
    return teacher.views(crops, GRIDS).flatten(0, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_options(args: argparse.Namespace, folder: Path, store: Path) -> BuildOptions:
    return BuildOptions(
        source=str(folder), store=str(store), grids=GRIDS, teacher=args.teacher, pretrained=args.pretrained,
        batch_size=args.batch_size, device=args.device, image_size=args.image_size, compile=args.compile,
        progress=False, shard_size=max(args.batch_size, 64) * 4, chunk_size=max(args.batch_size, 64),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the teacher (CUDA only)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        folder = sample_folder(Path(tmp), args.images)
        device = resolve_device(args.device)
        teacher = Teacher(resolve_identity(args.teacher, args.pretrained), device, compile=args.compile)
        bare = bare_forward_rate(teacher, folder, args.batch_size, args.image_size)
        del teacher
        warm = sample_folder(Path(tmp) / "warm", args.batch_size + args.images % args.batch_size)
        run_build(build_options(args, warm, Path(tmp) / "warm" / "store"), log=lambda line: None)  # untimed
        started = time.perf_counter()
        summary = run_build(build_options(args, folder, Path(tmp) / "store"), log=lambda line: None)
        total = time.perf_counter() - started
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"device: {device_name}; teacher {args.teacher} pretrained={args.pretrained}; "
          f"{args.images} images x 30 views; batch {args.batch_size}")
    print(f"bare teacher forward:   {bare:8.2f} images/s")
    print(f"zs-cache build (loop):  {summary.images_per_second:8.2f} images/s")
    print(f"zs-cache build (total): {args.images / total:8.2f} images/s  (incl. model load and store setup)")
    print(f"ratio loop/bare:        {summary.images_per_second / bare:8.3f}  (target >= 0.90)")
    overhead = 1000 * (1 / summary.images_per_second - 1 / bare)
    print(f"pipeline overhead:      {overhead:8.2f} ms per image (decode, views, writes not hidden behind the tower)")


if __name__ == "__main__":
    main()
