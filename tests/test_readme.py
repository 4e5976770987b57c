"""The README's commands, run as written (the tiny teacher stands in for CLIP): each test takes its command out of
README.md, so an edit that breaks one fails here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, make_store

README = (REPO / "README.md").read_text()


def readme_command(comment: str) -> str:
    """The README line that ends in `# <comment>...`, without the comment."""
    (line,) = [line for line in README.splitlines() if f"# {comment}" in line]
    return line.split("#")[0].strip()


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command in bash with this environment's console scripts first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_small_cpu_run_trains_as_written(tmp_path):
    command = readme_command("small CPU run")
    assert command == "zs-train run --config tiny-cpu --store S --run-dir R"
    make_store(tmp_path / "built", image_size=64).rename(tmp_path / "S")  # 64px crops, as the demo's store
    done = shell(command, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "R" / "checkpoints" / "step-00000200.pt").is_file()


def test_the_readers_extra_is_named_where_the_snippets_are_shown():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(name.split(">")[0] for name in extras["readers"]) == ["duckdb", "pandas", "xarray"]
    snippet_at = README.index("import duckdb, numpy as np, pandas as pd, zarr")
    assert 'pip install "zeroseg[readers]"' in README[snippet_at - 400 : snippet_at]
