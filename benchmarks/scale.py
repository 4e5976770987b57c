"""Per-row costs of the steps that touch every manifest row, on a synthetic store of N rows.

The store has N manifest rows in parts of --shard-size rows (ImageNet-shaped keys `nXXXXXXXX/img_K.JPEG`,
random sha256 hashes) and fp16 features of random values with the views of --grids x --dim per row (small by default:
the steps measured here are about rows, not feature bytes), optionally a crops array. Each step runs in a
fresh Python process, which reports its seconds and its peak resident memory above the same process
after imports:

  manifest  reading the whole manifest (FeatureStore.manifest, every column, duplicates refused)
  plan      the no-op rerun's planning: which of the source's N keys are not yet in the store
  inspect   zs-cache inspect's summary (pipeline.check.describe)
  verify    zs-cache verify (pipeline.check.verify), on a second store of --verify-rows rows with real-sized
            features (30 views x 768 fp16, ViT-B/16's; verify reads every feature byte), its time per row
            extrapolated
  startup   one trainer rank's start-up: StoreReader.open and the dataset of its batches
  epoch     one epoch's sample order (trainer.sampling.SampleOrder.epoch)
  records   what a loader worker reads per features chunk of a store without crops: the image records of
            500 random chunks (StoreReader.chunk_records); its us/row is per image read, the same at any N

and prints seconds, microseconds per row, peak MiB and both extrapolated linearly to --extrapolate rows.
With --compact ROWS the steps run again after `zs-cache compact --rows-per-part ROWS` (its time printed):
one manifest part per shard against a few large ones.

    python benchmarks/scale.py --rows 1280000
    python benchmarks/scale.py --rows 1280000 --compact 131072
    python benchmarks/scale.py --rows 160000 --crops      # a store that keeps 16 px crops
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

STEPS = ("manifest", "plan", "inspect", "verify", "startup", "epoch", "records")
RECORD_CHUNKS = 500


def synthesise(
    path: Path, rows: int, shard_size: int, chunk_size: int, grids: list[int], dim: int, crops: bool
) -> None:
    from zeroseg.pipeline.manifest import ImageRecord, manifest_rows
    from zeroseg.pipeline.sources import SourceSpec
    from zeroseg.pipeline.store import FeatureStore
    from zeroseg.pipeline.store_meta import Preprocessing, StoreMeta
    from zeroseg.pipeline.teacher_identity import TeacherIdentity

    meta = StoreMeta(
        teacher=TeacherIdentity("synthetic", None, None, False),
        preprocessing=Preprocessing.of(16, 16, [0.5] * 3, [0.5] * 3),
        grids=grids, embed_dim=dim,
        shard_size=shard_size, chunk_size=chunk_size, stored_crops=crops,
        sources={"synthetic": SourceSpec("folder", str(path))},
    )  # fmt: skip
    store = FeatureStore.create(path / "store", meta)
    rng = np.random.default_rng(0)
    shards = -(-rows // shard_size)
    store.reserve(shards - 1, rows - (shards - 1) * shard_size)
    for shard in range(shards):
        count = min(shard_size, rows - shard * shard_size)
        features = rng.standard_normal((count, meta.num_views, dim)).astype(np.float16)
        pixels = rng.integers(0, 256, (count, 16, 16, 3), dtype=np.uint8) if crops else None
        record = store.write_shard(shard, features, pixels)
        first = shard * shard_size
        records = [
            ImageRecord("synthetic", key(first + i), first + i, rng.bytes(32).hex(), 500, 375) for i in range(count)
        ]
        store.commit(shard, manifest_rows(shard, records), record)


def key(i: int) -> str:
    return f"n{i // 1300:08d}/img_{i:08d}.JPEG"


def run_step(step: str, root: Path, rows: int) -> dict:
    """Seconds and peak resident bytes above the post-import baseline of one step, in this process."""
    from zeroseg.pipeline import check
    from zeroseg.pipeline.build import pending_keys
    from zeroseg.pipeline.store import FeatureStore
    from zeroseg.pipeline.store_reader import StoreReader
    from zeroseg.trainer.data import StoreBatches
    from zeroseg.trainer.sampling import BatchPlan

    path = root / ("verify" if step == "verify" else "") / "store"
    keys = [key(i) for i in range(rows)] if step == "plan" else None
    samples = StoreReader.open(path) if step in ("epoch", "records") else None
    baseline = peak_rss()
    started = time.perf_counter()
    if step == "manifest":
        FeatureStore.open(path).manifest()
    elif step == "plan":
        left = pending_keys(FeatureStore.open(path), keys, "synthetic")
        assert not left, f"{len(left)} keys pending on a complete store"
    elif step == "inspect":
        check.describe(FeatureStore.open(path))
    elif step == "verify":
        store = FeatureStore.open(path)
        problems, _ = check.verify(store, progress=False)
        assert not problems, problems[:3]
        return {"seconds": time.perf_counter() - started, "peak": max(0, peak_rss() - baseline),
                "rows": store.features.shape[0]}  # fmt: skip
    elif step == "startup":
        StoreBatches(StoreReader.open(path), BatchPlan(256, 1, 8, 0), 16, 0)
    elif step == "epoch":
        StoreBatches(samples, BatchPlan(256, 1, 8, 0), 16, 0).order.epoch(0)
    else:
        chunks = np.unique(samples.chunk_of)
        picked = np.random.default_rng(0).choice(chunks, min(RECORD_CHUNKS, len(chunks)), replace=False)
        for index in picked.tolist():
            samples.chunk_records(index)
        images = int(np.isin(samples.chunk_of, picked).sum())
        return {"seconds": time.perf_counter() - started, "peak": max(0, peak_rss() - baseline), "images": images}
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak": max(0, peak_rss() - baseline)}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_280_000, help="manifest rows of the synthetic store")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--grids", type=lambda text: [int(g) for g in text.split(",")], default=[1],
                        help="grids of the synthetic features' views, e.g. 1,2,3,4 (30 views)")
    parser.add_argument("--dim", type=int, default=8, help="feature dim of the synthetic features")
    parser.add_argument("--crops", action="store_true", help="the store keeps (16, 16, 3) crops")
    parser.add_argument("--extrapolate", type=int, default=12_000_000, help="rows to extrapolate to")
    parser.add_argument("--verify-rows", type=int, default=8192, help="rows of the real-sized store verify reads")
    parser.add_argument("--root", help="reuse (or create) the synthetic store under this folder")
    parser.add_argument("--repeat", type=int, default=1, help="runs per step: the least seconds, the most memory")
    parser.add_argument("--compact", type=int, metavar="ROWS", help="then compact into parts of ROWS rows and rerun")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(run_step(args.step, Path(args.root), args.rows)))
        return
    root = Path(args.root or tempfile.mkdtemp(prefix="zs-scale-"))
    if not (root / "store").exists():
        started = time.perf_counter()
        synthesise(root, args.rows, args.shard_size, args.chunk_size, args.grids, args.dim, args.crops)
        print(f"synthesised {args.rows} rows under {root} in {time.perf_counter() - started:.0f} s")
    if not (root / "verify" / "store").exists():
        verify_rows = min(args.rows, args.verify_rows)
        synthesise(root / "verify", verify_rows, args.shard_size, args.chunk_size, [1, 2, 3, 4], 768, args.crops)
        print(f"synthesised {verify_rows} rows of 30 x 768 fp16 features for verify")
    print_steps(root, args.rows, args.extrapolate, args.repeat)
    if args.compact:
        from zeroseg.pipeline.compact import compact
        from zeroseg.pipeline.options import CompactOptions

        started = time.perf_counter()
        summary = compact(CompactOptions(root / "store", args.compact))
        print(f"{summary.line()} in {time.perf_counter() - started:.1f} s")
        print_steps(root, args.rows, args.extrapolate, args.repeat)


def print_steps(root: Path, rows: int, extrapolate: int, repeat: int) -> None:
    """Each step in a fresh process: its seconds and peak memory, and both extrapolated to `extrapolate` rows."""
    from zeroseg.pipeline.store import FeatureStore

    parts = len(FeatureStore.open(root / "store").part_files())
    print(f"{parts} manifest parts")
    print(f"{'step':<8} {'seconds':>8} {'us/row':>7} {'peak MiB':>9} | at {extrapolate:,}: {'s':>7} {'MiB':>7}")
    for step in STEPS:
        command = [sys.executable, __file__, "--step", step, "--root", str(root), "--rows", str(rows)]
        results = [json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                   for _ in range(repeat)]  # fmt: skip
        seconds, mib = min(r["seconds"] for r in results), max(r["peak"] for r in results) / 2**20
        measured = results[0].get("rows", rows)  # verify's store has its own rows
        per_row = 1e6 * seconds / results[0].get("images", measured)
        at = f"{'(per image)':>15}" if "images" in results[0] else (
            f"{seconds * extrapolate / measured:7.0f} {mib * extrapolate / measured:7.0f}")
        print(f"{step:<8} {seconds:8.2f} {per_row:7.2f} {mib:9.0f} | {' ' * (len(f'at {extrapolate:,}:') - 1)} {at}")


if __name__ == "__main__":
    pa.set_cpu_count(pa.cpu_count())
    main()
