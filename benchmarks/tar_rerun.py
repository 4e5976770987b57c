"""The nightly no-op rerun of a CC12M-shaped tar source, with and without the persisted tar index.

Synthesises --tars webdataset tars (CC12M: about 1,200 of 10,000 samples) of S samples each, every sample
three tiny members (.jpg, .json, .txt, as img2dataset writes), and a store that already holds every image
(its manifest written directly, shards of one tar as a build plans them; no features). Then times, each in
a fresh process, `zs-cache build` of that source into that store, which lists the source, finds nothing to
do and exits (the seconds of run_build in a fresh process, after its imports):

  scan    without the index (.zs-tar-index removed): every member header of every tar is read
  index   with the index the scan run wrote: one small JSON per tar, the tars only stat()ed

for each S of --samples, --repeats times each (the median kept), fits seconds = a + b * images per mode by least
squares (a: start-up and per-tar costs, the same 1,200 tars at any S) and extrapolates to --extrapolate images
only when the medians increase with the images and the fit has a positive slope and start-up; otherwise it says
so and prints no
extrapolation (noise larger than the effect: widen --samples or raise --repeats). The tars stay in the page
cache, so the scan times are CPU, not disk: on a cold network filesystem the scan is slower still.

    python benchmarks/tar_rerun.py --tars 1200 --samples 100,300
"""

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

TINY_TEACHER = Path(__file__).parents[1] / "tests" / "fixtures" / "zs-tiny-clip.json"
IMAGE_SIZE = 32
MODES = ("scan", "index")


def synthesise(root: Path, tars: int, samples: int) -> tuple[Path, Path]:
    """(source folder, store) with every image of the source committed."""
    source, store = root / "cc12m", root / "store"
    source.mkdir(parents=True)
    jpeg, caption = b"\xff\xd8\xff\xe0" + bytes(60), b'{"caption": "a photo"}'
    for t in range(tars):
        with tarfile.open(source / f"{t:05d}.tar", "w") as archive:
            for s in range(samples):
                for extension, data in (("jpg", jpeg), ("json", caption), ("txt", b"a photo")):
                    info = tarfile.TarInfo(f"{t * samples + s:09d}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    commit_everything(source, store)
    return source, store


def commit_everything(source: Path, store_path: Path) -> None:
    import torch

    from zeroseg.pipeline.manifest import ImageRecord, manifest_rows
    from zeroseg.pipeline.options import BuildOptions
    from zeroseg.pipeline.shards import EncodeSettings, plan_shards, prepare_store
    from zeroseg.pipeline.sources import open_source, tar_of
    from zeroseg.pipeline.teacher import Teacher, resolve_identity

    opts = BuildOptions(source=str(source), store=str(store_path), teacher=str(TINY_TEACHER), pretrained="none",
                        device="cpu", image_size=IMAGE_SIZE, store_crops=True, progress=False)  # fmt: skip
    identity = resolve_identity(opts.teacher, opts.pretrained, opts.quick_gelu)
    teacher = Teacher(identity, torch.device("cpu"))
    name = source.stem
    settings = EncodeSettings(tuple(opts.grids), opts.batch_size, opts.image_size, name, True)
    tar_source = open_source(source)
    store = prepare_store(None, tar_source, identity, teacher.format(), settings, opts)
    for shard in plan_shards(tar_source.keys(), set(), store.meta.shard_size, tar_of):
        first = store.shard_rows(shard.id)
        records = [ImageRecord(name, key, first + i, "0" * 64, 500, 375) for i, key in enumerate(shard.keys)]
        store.commit(shard.id, manifest_rows(shard.id, records), {})


def rerun(source: Path, store: Path) -> float:
    """Seconds of one no-op `zs-cache build` (pipeline.build.run_build) in a fresh process, after its imports."""
    command = [sys.executable, __file__, "--rerun", str(source), str(store)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)["seconds"]


def timed_rerun(source: str, store: str) -> dict:
    from zeroseg.pipeline.build import run_build
    from zeroseg.pipeline.options import BuildOptions

    opts = BuildOptions(source=source, store=store, teacher=str(TINY_TEACHER), pretrained="none", device="cpu",
                        image_size=IMAGE_SIZE, progress=False)  # fmt: skip
    started = time.perf_counter()
    summary = run_build(opts, log=lambda line: None)
    seconds = time.perf_counter() - started
    if summary.processed:
        raise SystemExit(f"the rerun was not a no-op: {summary.line()}")
    return {"seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tars", type=int, default=1200)
    parser.add_argument("--samples", default="100,300", help="samples per tar, comma-separated (two or more)")
    parser.add_argument("--extrapolate", type=int, default=12_000_000, help="images to extrapolate to")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode at each size (median kept)")
    parser.add_argument("--root", help="work folder (default: a new temporary one, removed at the end)")
    parser.add_argument("--rerun", nargs=2, metavar=("SOURCE", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rerun:
        print(json.dumps(timed_rerun(*args.rerun)))
        return
    sizes = sorted({int(s) for s in args.samples.split(",")})
    if len(sizes) < 2 or sizes[0] < 1:
        parser.error(f"--samples needs two or more distinct positive sizes to fit a line, got '{args.samples}'")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    root = Path(args.root or tempfile.mkdtemp(prefix="zs-tar-rerun-"))
    print(f"{'images':>9} {'tars':>5} {'mode':<6} {'seconds':>8} {'us/image':>9}")
    measured: dict[str, list[tuple[int, float]]] = {mode: [] for mode in MODES}
    for samples in sizes:
        folder = root / f"s{samples}"
        started = time.perf_counter()
        source, store = synthesise(folder, args.tars, samples)
        images = args.tars * samples
        print(f"(synthesised {images} images in {args.tars} tars in {time.perf_counter() - started:.0f} s)")
        for mode in MODES:
            times = []
            for _ in range(args.repeats):
                if mode == "scan":  # each scan run writes the index the index runs read
                    shutil.rmtree(source / ".zs-tar-index", ignore_errors=True)
                times.append(rerun(source, store))
            seconds = statistics.median(times)
            measured[mode].append((images, seconds))
            print(f"{images:9d} {args.tars:5d} {mode:<6} {seconds:8.2f} {1e6 * seconds / images:9.2f}  "
                  f"(median of {' '.join(f'{t:.2f}' for t in times)})")
        shutil.rmtree(folder)
    print(f"least-squares fit seconds = a + b * images, extrapolated to {args.extrapolate:,} images in {args.tars} "
          f"tars:")  # fmt: skip
    fits = {}
    for mode, points in measured.items():
        images, seconds = zip(*points)
        slope, intercept = np.polyfit(images, seconds, 1)
        line = f"  {mode:<6} a = {intercept:6.2f} s, b = {1e6 * slope:6.2f} us/image"
        if slope <= 0 or intercept < 0 or any(b <= a for a, b in zip(seconds, seconds[1:])):
            print(f"{line} -> no extrapolation: the times do not increase with the images (noise larger than the "
                  f"effect: widen --samples or raise --repeats)")
            continue
        fits[mode] = intercept + slope * args.extrapolate
        print(f"{line} -> {fits[mode]:7.1f} s")
    if len(fits) == len(MODES):
        print(json.dumps({"ratio_scan_over_index": round(fits["scan"] / fits["index"], 1)}))
    if not args.root:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
