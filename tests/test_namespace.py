"""One import namespace: zeroseg.pipeline / zeroseg.trainer / zeroseg.evaluation, nothing at the top level.

Another project's `trainer` or `evaluation` package on the path, or a folder of that name in the
working directory, must change nothing; a built wheel holds only the `zeroseg` package.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMPOSTOR = "raise ImportError('the unrelated {name} package was imported')\n"


def _python(*args: str, cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _impostors(root: Path) -> Path:
    """Packages named like the stage folders whose import fails loudly (a stand-in for Coqui's `trainer`)."""
    for name in ("pipeline", "trainer", "evaluation"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(IMPOSTOR.format(name=name))
        (root / name / "model.py").write_text(IMPOSTOR.format(name=name))
    return root


@pytest.mark.parametrize("where", ["site-packages", "working-directory"])
def test_unrelated_top_level_packages_change_nothing(tmp_path, where):
    impostors = _impostors(tmp_path / "impostors")
    cwd = impostors if where == "working-directory" else tmp_path
    extra = impostors if where == "site-packages" else None
    code = "import zeroseg.trainer.model, zeroseg.evaluation.cli, zeroseg.pipeline.cli; print('ok')"
    imported = _python("-c", code, cwd=cwd, extra_path=extra)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "ok"
    for command in ("cache", "train", "eval", "segment"):
        shown = _python("-m", "zeroseg", command, "--help", cwd=cwd, extra_path=extra)
        assert shown.returncode == 0, shown.stderr
        assert "Usage" in shown.stdout


def test_no_top_level_stage_packages_are_installed(tmp_path):
    """Outside the repository, `import trainer` finds nothing of ours."""
    for name in ("pipeline", "trainer", "evaluation"):
        probe = _python("-c", f"import importlib.util; print(importlib.util.find_spec('{name}'))", cwd=tmp_path)
        assert probe.stdout.strip() == "None", probe.stdout


def test_python_m_zeroseg_dispatches_and_refuses_unknown_commands(tmp_path):
    assert "zs-cache" in _python("-m", "zeroseg", "--help", cwd=tmp_path).stdout
    unknown = _python("-m", "zeroseg", "fly", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "unknown command 'fly'" in unknown.stderr
    bare = _python("-m", "zeroseg", cwd=tmp_path)
    assert bare.returncode == 2
