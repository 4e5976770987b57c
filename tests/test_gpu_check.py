"""benchmarks/gpu_check.py, the one command for a GPU session: its argument lists, run on the CPU with the tiny
sizes, are the GPU run's with other sizes; every part runs and reports."""

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
LABELS = ["student, stored crops", "student, batch x 2", "student, default path", "student, device decode",
          "ddp, 2 processes", "evaluation, whole", "evaluation, slide", "device decode", "teacher views",
          "teacher, eager", "teacher, compiled"]  # fmt: skip


def test_the_gpu_runs_arguments_are_the_tiny_runs_with_other_sizes():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    gpu, tiny = (gpu_check.runs(gpu_check.SIZES[name]) for name in ("gpu", "tiny"))
    assert [label for label, _ in gpu] == [label for label, _ in tiny] == LABELS
    for (_, big), (_, small) in zip(gpu, tiny):
        assert [a for a in big if a.startswith("--")] == [a for a in small if a.startswith("--")]
        assert big[0] == small[0]  # the same script
    assert dict(zip(*[iter(gpu[0][1][1:])] * 2))["--preset"] == "base"


def test_gpu_check_runs_every_part_on_the_cpu_with_tiny_settings():
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.startswith("GPUs: none; torch ")
    summary = result.stdout.split("== summary", 1)[1].splitlines()[1:]
    assert [line[:23].strip() for line in summary] == LABELS
    crops, double, default, decoded, ddp, whole, slide, decode, views, teacher, compiled = summary
    for line in (crops, default, decoded):
        assert "ratio store / memory:" in line and "images/s" in line and "data wait:" in line
    assert "crops decoded from the source (full decode)" in result.stdout
    assert "crops decoded from the source (device decode)" in result.stdout
    assert "GFLOP per training image" in result.stdout
    assert "ratio store / memory:" in double
    assert "2 processes (gloo): one step in" in ddp
    assert all("end to end" in line and "model only" in line for line in (whole, slide))
    assert decode.count("ratio full / loader side of --decode device:") == 3  # photos as they are, 1600, 3000 px
    assert decode.count("device decode+crop on cpu, batches of 4:") == 3
    assert "ratio peak memory teacher dtype / float32, cast:" in views
    assert "ratio loop/bare:" in teacher and "pipeline overhead:" in teacher
    assert "skipped: the teacher compiles only on CUDA" in compiled
