"""zeroseg as `pip install` gives it, from a wheel built from this checkout into a fresh venv (conftest.wheel_bin),
run from folders that are not the repository: what the wheel holds, the demo, the job specs, the nightly runner,
configs by name. tests/test_readme.py runs the README's stage commands from the same venv."""

import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from zeroseg.workflows import JOB_SPECS


def run(wheel_bin: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(wheel_bin / args[0]), *map(str, args[1:])], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "HF_HUB_OFFLINE": "1"})


def test_the_wheel_holds_the_zeroseg_namespace_its_configs_and_job_specs_and_no_repository_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"zeroseg"}
    for module in ("zeroseg/__main__.py", "zeroseg/pipeline/store.py", "zeroseg/trainer/model.py",
                   "zeroseg/evaluation/cli.py", "zeroseg/evaluation/names/sclip_ade20k.txt",
                   "zeroseg/configs/zeroseg-imagenet.yaml",
                   "zeroseg/configs/ablations/table4-base.yaml", "zeroseg/configs/zs-tiny-clip.json",
                   "zeroseg/workflows/nightly.py", *(f"zeroseg/workflows/{name}" for name in JOB_SPECS)):  # fmt: skip
        assert module in names
    assert not [name for name in names if name.endswith((".jpg", ".png", ".jpeg"))]  # sample data is generated
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "zs-train = zeroseg.trainer.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_the_demo_runs_every_stage_from_the_wheel(wheel_bin, tmp_path):
    done = run(wheel_bin, "python", "-m", "zeroseg", "demo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "demo-out"
    assert (out / "store" / "zarr.json").is_file() and (out / "data" / "VOCdevkit" / "VOC2012").is_dir()
    assert (out / "run" / "checkpoints" / "step-00000100.pt").is_file() and (out / "run" / "curves.png").is_file()
    assert (out / "eval" / "voc.md").is_file() and (out / "eval" / "coco.json").is_file()
    assert sorted(p.name for p in (out / "segment").glob("*-overlay.png")) == [
        "000000128372-overlay.png", "000000194216-overlay.png", "000000343934-overlay.png",
        "000000404249-overlay.png", "000000464689-overlay.png",
    ]  # fmt: skip
    assert "demo finished" in done.stdout and "voc val (2 images): mIoU" in done.stdout


def test_the_demo_refuses_a_folder_it_did_not_write_and_demo_sh_calls_it(wheel_bin, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    refused = run(wheel_bin, "python", "-m", "zeroseg", "demo", tmp_path, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith(f"error: demo output {tmp_path} exists and was not")
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert "python -m zeroseg demo" in (REPO / "demo.sh").read_text()


def test_job_specs_runner_versions_and_configs_by_name_from_the_wheel(wheel_bin, tmp_path):
    jobs = run(wheel_bin, "python", "-m", "zeroseg", "jobs", "jobs", cwd=tmp_path)
    assert jobs.returncode == 0, jobs.stderr
    assert sorted(jobs.stdout.split()) == sorted(f"jobs/{name}" for name in JOB_SPECS)
    for name in JOB_SPECS:
        assert (tmp_path / "jobs" / name).read_bytes() == (REPO / "workflows" / name).read_bytes()
    runner = run(wheel_bin, "python", "-m", "zeroseg", "nightly", "--help", cwd=tmp_path)
    assert runner.returncode == 0 and "--config" in runner.stdout
    for command in ("zs-cache", "zs-train", "zs-eval", "zs-segment"):
        version = run(wheel_bin, command, "--version", cwd=tmp_path)
        assert version.stdout.strip() == f"{command} 0.1.0", version.stderr
    config = run(wheel_bin, "zs-train", "config", "--config", "zeroseg-imagenet", cwd=tmp_path)
    assert config.returncode == 0 and "image_size: 224" in config.stdout, config.stderr
