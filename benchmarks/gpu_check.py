"""One command for a GPU session: what the GPU, the student, evaluation and the teacher do, in one run.

Prints the machine (GPU names, torch, CUDA and driver versions), then runs the benchmarks next to this file one
after another on the same device, every part whatever happened to the ones before (a failed part is reported
with its exit code and last error line), the student first and the teacher last:

  student       training steps fed from the store vs from batches in memory (train_throughput.py): with
                stored crops at batch B (images/s, data-wait fraction, FLOP per image, MFU, peak memory) and at
                batch 2B (peak memory); the default path (crops decoded from the source images by the loader
                workers); a `--decode device` store (the steps decode the JPEGs on the GPU)
  ddp           one 2-process training step under torchrun (NCCL on two GPUs, gloo with --tiny; skipped with
                fewer than two GPUs)
  evaluation    images/s of zs-eval's segmenter, whole-image and slide inference
  decode        `--decode device`: decode_jpeg + torch crop on the device (nvjpeg on CUDA), images/s in batches
                of B, next to the CPU per image of the full decode and of a loader's side of the device decode
  teacher       peak memory of a batch of teacher views built in bf16 vs fp32 and cast; bare ViT-L-14 forward
                vs `zs-cache build`, without and with torch.compile

One set of argument lists (`runs`) takes its sizes from SIZES: the default ("gpu") fits one H100 in under 8
minutes (random weights: no download); --tiny shrinks the sizes to the tiny test teacher and student on the CPU
(what the test suite runs; the compiled teacher is skipped there, as the teacher compiles only on CUDA; each
part runs in a child forked from this process, which imports each script once, instead of a fresh interpreter).
The stores the student parts build hold the tiny teacher's 32-dim features; the student's teacher_dim follows
the store.

    python benchmarks/gpu_check.py            # one or two GPUs
    python benchmarks/gpu_check.py --tiny     # CPU smoke run
"""

import argparse
import functools
import importlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY_TEACHER = str(HERE.parent / "tests" / "fixtures" / "zs-tiny-clip.json")

SIZES = {
    "gpu": {"device": "cuda", "preset": "base", "images": 4096, "size": 224, "batch": 256, "workers": 8, "steps": 20,
            "rounds": 3, "warmup": 5, "eval_images": 64, "short_side": 448, "teacher": "ViT-L-14",
            "teacher_images": 1024, "teacher_batch": 64, "view_size": 224, "decode_seconds": 1},
    "tiny": {"device": "cpu", "preset": "tiny", "images": 16, "size": 32, "batch": 4, "workers": 0, "steps": 2,
             "rounds": 1, "warmup": 1, "eval_images": 2, "short_side": 64, "teacher": TINY_TEACHER,
             "teacher_images": 8, "teacher_batch": 4, "view_size": 32, "decode_seconds": 0.05},
}  # fmt: skip


def runs(size: dict) -> list[tuple[str, list[str]]]:
    """(label, script and arguments) of every part, in order."""
    student = ["train_throughput.py", "--preset", size["preset"], "--device", size["device"], "--images",
               str(size["images"]), "--image-size", str(size["size"]), "--workers", str(size["workers"])]
    timed = ["--batch-size", str(size["batch"]), "--steps", str(size["steps"]), "--rounds", str(size["rounds"]),
             "--warmup", str(size["warmup"])]
    evaluation = ["eval_throughput.py", "--preset", size["preset"], "--device", size["device"], "--images",
                  str(size["eval_images"]), "--short-side", str(size["short_side"])]
    teacher = ["cache_throughput.py", "--teacher", size["teacher"], "--pretrained", "none", "--device",
               size["device"], "--images", str(size["teacher_images"]), "--batch-size", str(size["teacher_batch"]),
               "--image-size", str(size["size"])]
    return [
        ("student, stored crops", [*student, *timed, "--store-crops"]),
        ("student, batch x 2", [*student, "--batch-size", str(2 * size["batch"]), "--steps", "2", "--rounds", "1",
                                "--warmup", "1", "--store-crops"]),
        ("student, default path", [*student, *timed]),
        ("student, device decode", [*student, *timed, "--decode", "device"]),
        ("ddp, 2 processes", ["ddp_step", "--preset", size["preset"], "--device", size["device"], "--image-size",
                              str(size["size"])]),
        ("evaluation, whole", [*evaluation, "--mode", "whole"]),
        ("evaluation, slide", [*evaluation, "--mode", "slide"]),
        ("device decode", ["decode_cost.py", "--device", size["device"], "--batch-size", str(size["batch"]),
                           "--rounds", "1", "--seconds", str(size["decode_seconds"]),
                           "--crop-size", str(size["size"])]),
        ("teacher views", ["view_memory.py", "--device", size["device"], "--batch-size", str(size["teacher_batch"]),
                           "--crop-size", str(size["size"]), "--view-size", str(size["view_size"])]),
        ("teacher, eager", [*teacher, "--no-compile"]),
        ("teacher, compiled", [*teacher, "--compile"]),
    ]  # fmt: skip


SUMMARY = [  # what each part's summary line quotes from its output
    re.compile(r"fed from the store :.*images/s"),
    re.compile(r"ratio store / memory: \S+"),
    re.compile(r"data wait: \S+"),
    re.compile(r"MFU fed from the store: \S+"),
    re.compile(r"peak memory: \S+ GiB at batch \d+"),
    re.compile(r"2 processes \(\w+\): .*"),
    re.compile(r"end to end\s+\S+ images/s"),
    re.compile(r"model only\s+\S+ images/s"),
    re.compile(r"ratio full / loader side of --decode device: \S+"),
    re.compile(r"device decode\+crop on \w+, batches of \d+: \S+ images/s, \S+ ms CPU per image"),
    re.compile(r"views, (?:teacher dtype|float32, cast):\s+peak\s+\S+ MiB"),
    re.compile(r"ratio peak memory teacher dtype / float32, cast: \S+"),
    re.compile(r"ratio loop/bare:\s+\S+"),
    re.compile(r"pipeline overhead:\s+\S+ ms per image"),
]


def machine() -> str:
    """GPU names, torch, CUDA and driver versions, CPU cores."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    driver = "none"
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True).stdout.split("\n")[0].strip() or "unknown"
    return (f"GPUs: {', '.join(gpus) or 'none'}; torch {torch.__version__}, CUDA {torch.version.cuda}, driver "
            f"{driver}; {len(os.sched_getaffinity(0))} CPU cores")  # fmt: skip


def ddp_step(preset: str, device: str, image_size: int) -> subprocess.CompletedProcess | str:
    """One training step of 2 processes under torchrun on a store of 32 fixture photos; a reason when skipped."""
    import torch

    sys.path.insert(0, str(HERE))
    from train_throughput import fixture_store

    if device == "cuda" and torch.cuda.device_count() < 2:
        return f"skipped: {torch.cuda.device_count()} GPU visible"
    with tempfile.TemporaryDirectory() as scratch:
        store = fixture_store(Path(scratch), 32, image_size, True, "full", device)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                   "-m", "zeroseg.trainer.cli", "run", "--store", str(store), "--run-dir", f"{scratch}/run", "--preset",
                   preset, "--device", "auto" if device == "cuda" else device, "--batch-size", "4", "--workers", "0",
                   "--steps", "1", "--no-progress", "--set", "model.teacher_dim=32", "--set",
                   "schedule.warmup_steps=0"]  # fmt: skip
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        backend = "nccl" if device == "cuda" else "gloo"
        if result.returncode == 0:
            result.stdout += f"2 processes ({backend}): one step in {time.perf_counter() - started:.1f} s\n"
        return result


def script_main(script: str, arguments: list[str]) -> Callable[[], int | None]:
    """The script's main() on `arguments`, the script imported here (its imports done once for every run of it)."""
    module = importlib.import_module(Path(script).stem)

    def run() -> int | None:
        sys.argv = [module.__file__, *arguments]
        return module.main()

    return run


def echoed(step: Callable[[], subprocess.CompletedProcess]) -> int:
    """step()'s output printed, its exit code returned."""
    result = step()
    print(result.stdout, end="")
    print(result.stderr, end="", file=sys.stderr)
    return result.returncode


def forked(part: Callable[[], int | None]) -> subprocess.CompletedProcess:
    """part() in a child forked from this process: its exit code and output, as a fresh interpreter would give
    them without its seconds of imports. CPU only (a child cannot use CUDA once its parent has touched it), and
    this process only imports: a lock that one of its threads held at the fork would stay locked in the child."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            code = 1
            try:
                code = part() or 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess([], code, out.read(), err.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a smoke run)")
    args = parser.parse_args()
    print(machine(), flush=True)
    summary, failed, started = [], 0, time.perf_counter()
    for label, (script, *arguments) in runs(SIZES["tiny" if args.tiny else "gpu"]):
        print(f"== {label}: {script} {' '.join(arguments)}", flush=True)
        if args.tiny and "--compile" in arguments:
            summary.append(f"{label:<23} skipped: the teacher compiles only on CUDA")
            continue
        if script == "ddp_step":
            options = dict(zip(arguments[::2], arguments[1::2]))
            step = functools.partial(ddp_step, options["--preset"], options["--device"], int(options["--image-size"]))
            result = forked(functools.partial(echoed, step)) if args.tiny else step()
        elif args.tiny:
            result = forked(script_main(script, arguments))
        else:
            result = subprocess.run([sys.executable, str(HERE / script), *arguments], capture_output=True, text=True)
        if isinstance(result, str):
            summary.append(f"{label:<23} {result}")
            continue
        print(result.stdout, end="", flush=True)
        if result.returncode:
            failed += 1
            print(result.stderr, end="", file=sys.stderr)
            lines = result.stderr.strip().splitlines() or ["no error output"]
            last = next((line for line in lines if line.startswith("error: ")), lines[-1])
            summary.append(f"{label:<23} FAILED (exit {result.returncode}): {last}")
            continue
        quoted = [m.group(0) for pattern in SUMMARY for m in pattern.finditer(result.stdout)]
        summary.append(f"{label:<23} " + "; ".join(" ".join(q.split()) for q in quoted))
    print(f"== summary ({time.perf_counter() - started:.0f} s, {failed} failed)")
    print("\n".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
