"""`python -m zeroseg demo` from a folder that is not the repository: every stage on the generated sample scenes,
the outputs demo.sh always gave; a folder the demo did not write is refused."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_demo_runs_every_stage_from_any_folder(tmp_path):
    done = subprocess.run([sys.executable, "-m", "zeroseg", "demo"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "TQDM_DISABLE": "1"})  # fmt: skip
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


def test_demo_refuses_a_folder_it_did_not_write_and_demo_sh_calls_it(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    refused = subprocess.run([sys.executable, "-m", "zeroseg", "demo", str(tmp_path)], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.startswith(f"error: demo output {tmp_path} exists and was not")
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert "python -m zeroseg demo" in (REPO / "demo.sh").read_text()
