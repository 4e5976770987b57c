"""The README's commands, run as written (the tiny teacher stands in for CLIP) by zeroseg installed from a wheel into a
fresh venv (conftest.wheel_bin), in a folder that is not the repository: each test takes its command out of README.md,
so an edit that breaks one fails here."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import COCO_INSTANCES, PHOTOS, REPO, SAMPLES, make_store, tiny_checkpoint

README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    """Every zeroseg command line of the README's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+", " ", line.split(" #")[0]).strip()
            if re.match(r"(zs-cache|zs-train|zs-eval|zs-segment) ", line):
                commands.append(line)
    return commands


# What the README's lines name, in a sandbox with the sample scenes and the tiny teacher: (README text, stand-in)
STAND_INS = [
    ("--teacher ViT-L-14 --pretrained openai", "--teacher zs-tiny-clip --pretrained none"),
    ("--teacher ViT-B-16 --pretrained openai", "--teacher zs-tiny-clip --pretrained none"),
    ("--device cuda:0", "--device cpu"),
    ("/data/imagenet/train", "photos"),
    ("/data/zs-store", "store"),
    ("/data/coco/annotations/instances_val2017.json", str(COCO_INSTANCES)),
    ("/data", "data"),
    ("voc context coco", "voc coco"),  # no PASCAL Context among the samples
    ("runs/zeroseg-imagenet", "runs/zs"),
    ("step-00100000", "step-00000002"),
    ("CKPT", "runs/zs/checkpoints/step-00000002.pt"),
    ("other_method/voc", str(SAMPLES / "VOCdevkit" / "VOC2012" / "SegmentationClass")),
]
# Lines a 2-core test machine cannot run (the paper's ViT-B training, 8 Dask workers, a remote scheduler), and the
# benchmarks the sample scenes do not hold (Cityscapes, COCO-Stuff, ADE20K: tests/test_benchmarks.py has their layouts)
NOT_RUN = ("run --config zeroseg-imagenet", "--workers 8", "--scheduler", "--resume", "--config tiny-cpu",
           "prepare cityscapes", "prepare coco-stuff", "cityscapes ade20k")


@pytest.mark.slow
def test_the_readme_commands_run_as_written_on_the_sample_scenes(wheel_bin, tmp_path):
    """Each README command of the three stages, in order, with only STAND_INS replaced (the tiny run that stands
    for runs/zs is trained first; the small CPU run has its own test below; NOT_RUN are left out)."""
    (tmp_path / "photos").mkdir()
    for photo in PHOTOS[:4]:  # the VOC scenes: each photo is segmented into 1000 ImageNet classes, the cost of the run
        shutil.copy(photo, tmp_path / "photos" / photo.name)
    shutil.copytree(SAMPLES / "VOCdevkit", tmp_path / "data" / "VOCdevkit", symlinks=True)
    shutil.copytree(SAMPLES / "coco" / "val2017", tmp_path / "data" / "coco" / "val2017")
    shutil.copytree(tiny_checkpoint(tmp_path / "tiny"), tmp_path / "runs" / "zs")
    ran = []
    for command in readme_commands():
        if any(flag in command for flag in NOT_RUN):
            continue
        for written, stand_in in STAND_INS:
            command = command.replace(written, stand_in)
        if command.startswith("zs-cache build") and "--teacher" not in command:  # the default teacher: ViT-L-14
            command += " --teacher zs-tiny-clip --pretrained none"
        started = time.monotonic()
        done = shell(command, tmp_path, wheel_bin)  # no --no-progress: bars stay off as stderr is not a terminal
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
        print(f"{time.monotonic() - started:6.1f} s  exit 0  {command}")  # the listing `pytest -s` shows
        ran.append(command.split(" --")[0])
    assert len(ran) == 17, ran
    assert (tmp_path / "compare" / "compare.md").is_file() and (tmp_path / "seg-in1k").is_dir()


def readme_command(comment: str) -> str:
    """The README line that ends in `# <comment>...`, without the comment."""
    (line,) = [line for line in README.splitlines() if f"# {comment}" in line]
    return line.split("#")[0].strip()


def shell(command: str, cwd: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    """The command in bash with the console scripts of bin_dir first on PATH."""
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_small_cpu_run_trains_as_written(wheel_bin, tmp_path):
    command = readme_command("small CPU run")
    assert command == "zs-train run --config tiny-cpu --store S --run-dir R"
    make_store(tmp_path / "built", image_size=64).rename(tmp_path / "S")  # 64px crops, as the demo's store
    done = shell(command, tmp_path, wheel_bin)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "R" / "checkpoints" / "step-00000200.pt").is_file()


def test_the_readers_extra_is_named_where_the_snippets_are_shown():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(name.split(">")[0] for name in extras["readers"]) == ["duckdb", "pandas", "xarray"]
    snippet_at = README.index("import duckdb, numpy as np, pandas as pd, zarr")
    assert 'pip install "zeroseg[readers]"' in README[snippet_at - 400 : snippet_at]
