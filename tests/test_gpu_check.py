"""benchmarks/gpu_check.py, the one command for a GPU session, runs end to end on the CPU with tiny settings."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_every_part_on_the_cpu_with_tiny_settings():
    result = subprocess.run([sys.executable, str(SCRIPT), "--tiny"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = result.stdout.split("== summary", 1)[1].splitlines()[1:]
    labels = [line[:22].strip() for line in summary]
    assert labels == ["teacher, eager", "teacher, compiled", "teacher views", "student, stored crops",
                      "student, device decode", "evaluation, whole", "evaluation, slide", "device decode"]  # fmt: skip
    teacher, compiled, views, student, student_decode, whole, slide, decode = summary
    assert "ratio loop/bare:" in teacher and "pipeline overhead:" in teacher
    assert "skipped: the teacher compiles only on CUDA" in compiled
    assert "ratio peak memory teacher dtype / float32, cast:" in views
    assert "ratio store / memory:" in student and "images/s" in student
    assert "ratio store / memory:" in student_decode
    assert "crops decoded from the source (device decode)" in result.stdout
    assert all("end to end" in line and "model only" in line for line in (whole, slide))
    assert decode.count("ratio full / loader side of --decode device:") == 3  # photos as they are, 1600, 3000 px
    assert decode.count("device decode+crop on cpu, batches of 4:") == 3
