"""`python -m zeroseg demo [OUT]`: all three stages on generated sample scenes (zeroseg.evaluation.samples) with
the tiny random-weight teacher, on the CPU, from any folder. OUT (default ./demo-out) is started over when it holds
an earlier demo; any other non-empty folder is refused."""

import os
import shutil
import sys
from pathlib import Path

from zeroseg.errors import UserError

MARKER = ".zeroseg-demo"  # written into OUT, so a rerun may remove what an earlier demo left
TEACHER = ("--teacher", "zs-tiny-clip", "--pretrained", "none")


def run_demo(out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _start_over(out)
    from zeroseg.evaluation.samples import COCO_INSTANCES, write_samples

    data = write_samples(out / "data")
    store, run = out / "store", out / "run"

    print("== stage one: teacher features of the sample scenes")
    for photos in (data / "VOCdevkit" / "VOC2012" / "JPEGImages", data / "coco"):
        _stage("cache", "build", photos, "--store", store, *TEACHER, "--image-size", "64",
               "--batch-size", "8", "--shard-size", "8", "--chunk-size", "8", "--no-progress")  # fmt: skip
    _stage("cache", "verify", store, "--no-progress")

    print("== stage two: a tiny ZeroSeg student")
    _stage("train", "run", "--store", store, "--run-dir", run, "--preset", "tiny", "--steps", "100",
           "--batch-size", "8", "--workers", "0", "--device", "cpu", "--set", "model.image_size=64",
           "--set", "optim.lr=1e-3", "--set", "schedule.warmup_steps=10", "--set", "run.checkpoint_every=50",
           "--no-progress")  # fmt: skip
    _stage("train", "plot", run)

    print("== evaluation: zero-shot mIoU on the VOC and COCO samples, open-vocabulary overlays")
    _stage("eval", "prepare", "coco", "--instances", data / "coco" / "annotations" / COCO_INSTANCES,
           "--data-root", data, "--no-progress")  # fmt: skip
    _stage("eval", "voc", "coco", "--checkpoint", run, "--data-root", data, "--out", out / "eval",
           "--device", "cpu", "--no-progress")  # fmt: skip
    _stage("segment", data / "coco" / "val2017", "--checkpoint", run, "--vocabulary", "coco",
           "--out", out / "segment", "--device", "cpu")  # fmt: skip
    print(f"""
demo finished:
  feature store   {store}
  checkpoint      {run / "checkpoints"} (loss curves: {run / "curves.png"})
  eval report     {out / "eval" / "voc.md"}, {out / "eval" / "coco.md"}
  overlays        {out / "segment"}
The teacher here has random weights, so the classes it gives are meaningless: this shows the
machinery, not the method. For real results cache with CLIP weights, e.g.
  zs-cache build IMAGES --store STORE --teacher ViT-L-14 --pretrained openai   (or a local weights file)
and train with --config zeroseg-imagenet.""")


def _start_over(out: Path) -> None:
    if out.exists() and not (out / MARKER).exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"demo output {out} exists and was not written by the demo: give an empty or new folder")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by `python -m zeroseg demo`; a rerun removes this folder\n")


def _stage(command: str, *args) -> None:
    """One stage command (cache, train, eval, segment) in this process, as its console script runs it; a failure
    ends the demo with the command's exit code."""
    from zeroseg.__main__ import main

    argv = sys.argv
    try:
        main([command, *map(str, args)])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        sys.argv = argv
