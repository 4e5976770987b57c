"""Memory and time of one batch of teacher views: built in the teacher's dtype (bfloat16) vs float32 then cast.

pipeline.crops.grid_views(..., dtype) writes each view into the bfloat16 output as it is made; before, the
Teacher built all views in float32 and cast the batch to bfloat16 (both copies alive at once). Each side is
measured on the same --batch-size of (--crop-size)^2 uint8 crops (the sample photos) with grids 1-4 at
--view-size: the peak memory above what was allocated before (CUDA: torch.cuda.max_memory_allocated; CPU:
the process's peak resident set, each side in a fresh process) and the seconds per batch.

    python benchmarks/view_memory.py                                   # batch 64, 224 px, this device
    python benchmarks/view_memory.py --batch-size 4 --crop-size 64 --view-size 32 --device cpu   # smoke run
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from zeroseg.evaluation.samples import sample_photos
from zeroseg.pipeline.crops import crop_from_bytes, grid_views
from zeroseg.runtime import resolve_device

GRIDS = [1, 2, 3, 4]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
SIDES = {
    "teacher dtype": lambda crops, size: grid_views(crops, GRIDS, size, MEAN, STD, torch.bfloat16),
    "float32, cast": lambda crops, size: grid_views(crops, GRIDS, size, MEAN, STD).to(torch.bfloat16),
}
MIB = 2**20


def batch_of_crops(batch: int, crop_size: int, device: torch.device) -> torch.Tensor:
    photos = sample_photos(tempfile.mkdtemp(prefix="zeroseg-samples-"))
    crops = [crop_from_bytes(photos[i % len(photos)].read_bytes(), crop_size)[0] for i in range(batch)]
    return torch.from_numpy(np.stack(crops)).to(device)  # (B, S, S, 3) uint8


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(side: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Peak bytes above the start and seconds per batch of one side, in this process."""
    crops = batch_of_crops(args.batch_size, args.crop_size, device)
    build = SIDES[side]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    else:
        start = peak_rss()
    views = build(crops, args.view_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - start
    else:
        peak = peak_rss() - start
    result = {"peak": peak, "views": views.numel() * views.element_size()}
    del views
    started = time.perf_counter()
    for _ in range(args.repeats):
        build(crops, args.view_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result["seconds"] = (time.perf_counter() - started) / args.repeats
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--view-size", type=int, default=224)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)  # one CPU side, in a child process
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.side:
        print(json.dumps(measure(args.side, args, device)))
        return 0
    if device.type == "cuda":
        results = {side: measure(side, args, device) for side in SIDES}
    else:  # the peak resident set only grows: each side in a process of its own
        child = [sys.executable, __file__, *sys.argv[1:]]
        runs = {side: subprocess.run([*child, "--side", side], capture_output=True, text=True) for side in SIDES}
        for run in runs.values():
            if run.returncode:
                print(run.stderr, end="", file=sys.stderr)
                return 1
        results = {side: json.loads(run.stdout) for side, run in runs.items()}
    views = sum(g * g for g in GRIDS)
    print(f"device {device}; {args.batch_size} crops of {args.crop_size} px x {views} views of {args.view_size} px; "
          f"bfloat16 views {results['teacher dtype']['views'] / MIB:.1f} MiB")
    for side, result in results.items():
        print(f"views, {side}:  peak {result['peak'] / MIB:8.1f} MiB, {1000 * result['seconds']:8.1f} ms per batch")
    after, before = results["teacher dtype"], results["float32, cast"]
    print(f"ratio peak memory teacher dtype / float32, cast: {after['peak'] / max(before['peak'], 1):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
