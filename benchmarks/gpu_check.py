"""One command for a GPU session: the throughput ratios of stage one, stage two and evaluation, in one run.

Runs the benchmarks next to this file one after another on the same device and prints their outputs, then
a summary of the numbers the scale issue asks for:

  teacher       bare ViT-L-14 forward vs `zs-cache build` (bf16 on CUDA), without and with torch.compile
  views         peak memory of a batch of teacher views built in bf16 vs built in fp32 and cast
  student       training steps fed from a store with crops vs from batches in memory, batch 256; and fed from
                a `--decode device` store without crops (the steps decode the JPEGs on the GPU)
  decode        `--decode device`: decode_jpeg + torch crop on the device (nvjpeg on CUDA), images/s in batches
                of 256, next to the CPU per image of the full decode and of a loader's side of the device decode
  evaluation    images/s of zs-eval's segmenter, whole-image and slide inference

Default sizes fit one GPU in under 8 minutes (random weights: no download). --tiny runs every part with the
tiny test teacher and student on the CPU in about a minute (what the test suite does; the compiled teacher is
skipped there, as the teacher compiles only on CUDA).

    python benchmarks/gpu_check.py            # one GPU
    python benchmarks/gpu_check.py --tiny     # CPU smoke run
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY_TEACHER = str(HERE.parent / "tests" / "fixtures" / "zs-tiny-clip.json")

GPU = {
    "teacher": ["--teacher", "ViT-L-14", "--pretrained", "none", "--images", "1024", "--batch-size", "64"],
    "views": ["--batch-size", "64"],
    "student": ["--preset", "base", "--store-crops", "--images", "4096", "--image-size", "224", "--batch-size",
                "256", "--workers", "8", "--steps", "20", "--rounds", "3", "--warmup", "5"],
    "student, decode": ["--preset", "base", "--decode", "device", "--images", "4096", "--image-size", "224",
                        "--batch-size", "256", "--workers", "8", "--steps", "20", "--rounds", "3", "--warmup", "5"],
    "evaluation": ["--preset", "base", "--images", "64"],
    "decode": ["--device", "cuda", "--batch-size", "256", "--rounds", "1", "--seconds", "1"],
}  # fmt: skip
TINY = {
    "teacher": ["--teacher", TINY_TEACHER, "--pretrained", "none", "--images", "8", "--batch-size", "4",
                "--image-size", "64", "--device", "cpu"],
    "views": ["--batch-size", "4", "--crop-size", "64", "--view-size", "32", "--device", "cpu"],
    "student": ["--preset", "tiny", "--store-crops", "--images", "16", "--image-size", "32", "--batch-size", "4",
                "--workers", "0", "--steps", "2", "--rounds", "1", "--warmup", "1", "--device", "cpu"],
    "student, decode": ["--preset", "tiny", "--decode", "device", "--images", "16", "--image-size", "32",
                        "--batch-size", "4", "--workers", "0", "--steps", "2", "--rounds", "1", "--warmup", "1",
                        "--device", "cpu"],
    "evaluation": ["--preset", "tiny", "--images", "2", "--short-side", "64", "--workers", "1", "--device", "cpu"],
    "decode": ["--device", "cpu", "--batch-size", "4", "--rounds", "1", "--seconds", "0.05", "--crop-size", "32"],
}  # fmt: skip

RUNS = [  # (summary label, script, part of the settings, extra arguments)
    ("teacher, eager", "cache_throughput.py", "teacher", ["--no-compile"]),
    ("teacher, compiled", "cache_throughput.py", "teacher", ["--compile"]),
    ("teacher views", "view_memory.py", "views", []),
    ("student, stored crops", "train_throughput.py", "student", []),
    ("student, device decode", "train_throughput.py", "student, decode", []),
    ("evaluation, whole", "eval_throughput.py", "evaluation", ["--mode", "whole"]),
    ("evaluation, slide", "eval_throughput.py", "evaluation", ["--mode", "slide"]),
    ("device decode", "decode_cost.py", "decode", []),
]
SUMMARY = [  # what each run's summary line quotes from its output
    re.compile(r"ratio loop/bare:\s+\S+"),
    re.compile(r"pipeline overhead:\s+\S+ ms per image"),
    re.compile(r"views, (?:teacher dtype|float32, cast):\s+peak\s+\S+ MiB"),
    re.compile(r"ratio peak memory teacher dtype / float32, cast: \S+"),
    re.compile(r"ratio store / memory: \S+"),
    re.compile(r"fed from the store :.*"),
    re.compile(r"end to end\s+\S+ images/s"),
    re.compile(r"model only\s+\S+ images/s"),
    re.compile(r"ratio full / loader side of --decode device: \S+"),
    re.compile(r"device decode\+crop on \w+, batches of \d+: \S+ images/s, \S+ ms CPU per image"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a smoke run)")
    args = parser.parse_args()
    settings = TINY if args.tiny else GPU
    summary, started = [], time.perf_counter()
    for label, script, part, extra in RUNS:
        if args.tiny and extra == ["--compile"]:
            summary.append(f"{label:<22} skipped: the teacher compiles only on CUDA")
            continue
        command = [sys.executable, str(HERE / script), *settings[part], *extra]
        print(f"== {label}: {' '.join(command[1:])}", flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        print(result.stdout, end="", flush=True)
        if result.returncode:
            print(result.stderr, end="", file=sys.stderr)
            print(f"gpu_check: {script} failed (exit {result.returncode})", file=sys.stderr)
            return 1
        quoted = [m.group(0) for pattern in SUMMARY for m in pattern.finditer(result.stdout)]
        summary.append(f"{label:<22} " + "; ".join(" ".join(q.split()) for q in quoted))
    print(f"== summary ({time.perf_counter() - started:.0f} s)")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
