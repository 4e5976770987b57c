"""Every command-line usage mistake on every command: one line on stderr naming the command, exit code 2."""

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import SAMPLES, VOC_ROOT, invoke, run_cli
from zeroseg.evaluation.cli import main as zs_eval

CACHE, TRAIN, EVAL, SEGMENT = (
    "zeroseg.pipeline.cli", "zeroseg.trainer.cli", "zeroseg.evaluation.cli", "zeroseg.evaluation.segment_cli"
)  # fmt: skip

SOURCE_FILE = re.compile(r"\b\w+\.py\b")
MISTAKES = [
    # (module, arguments, words the one line must hold)
    (CACHE, [], ["zs-cache", "give a command", "build"]),
    (CACHE, ["fly"], ["zs-cache", "No such command 'fly'"]),
    (CACHE, ["build", ".", "--store", "s", "--bogus"], ["zs-cache build", "--bogus"]),
    (CACHE, ["build", "."], ["zs-cache build", "--store"]),
    (CACHE, ["build", ".", "--store", "s", "--batch-size", "many"], ["zs-cache build", "--batch-size", "integer"]),
    (TRAIN, [], ["zs-train", "give a command", "run"]),
    (TRAIN, ["fly"], ["zs-train", "No such command 'fly'"]),
    (TRAIN, ["run", "--bogus"], ["zs-train run", "--bogus"]),
    (TRAIN, ["config", "optim.lr=1e-3"], ["zs-train config", "optim.lr=1e-3"]),
    (TRAIN, ["run", "--steps", "ten"], ["zs-train run", "--steps", "integer"]),
    (TRAIN, ["plot"], ["zs-train plot", "Missing argument"]),
    (EVAL, [], ["zs-eval", "Missing argument 'DATASET'"]),
    (EVAL, ["voc"], ["zs-eval", "--data-root"]),
    (EVAL, ["voc", "--data-root", ".", "--bogus"], ["zs-eval", "--bogus"]),
    (EVAL, ["voc", "--data-root", ".", "--short-side", "big"], ["zs-eval", "--short-side", "integer"]),
    (EVAL, ["prepare"], ["zs-eval prepare", "give a command", "coco"]),
    (EVAL, ["prepare", "fly"], ["zs-eval prepare", "No such command 'fly'"]),
    (SEGMENT, [], ["zs-segment", "Missing argument 'IMAGE'"]),
    (SEGMENT, ["a.jpg"], ["zs-segment", "--checkpoint"]),
    (SEGMENT, ["a.jpg", "--checkpoint", "c", "--bogus"], ["zs-segment", "--bogus"]),
    (SEGMENT, ["a.jpg", "--checkpoint", "c", "--stride", "wide"], ["zs-segment", "--stride", "integer"]),
]


@pytest.mark.parametrize(("module", "args", "words"), MISTAKES, ids=lambda value: " ".join(value) or "bare"
                         if isinstance(value, list) else None)
def test_usage_mistake_is_one_line_and_exit_code_2(module, args, words):
    result = run_cli(module, *args, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "--help" in lines[0]
    assert all(word in lines[0] for word in words), lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_zs_eval_takes_one_name_per_option(tmp_path):
    """--out and --decode-threads; the spellings renamed before any release (--output, --workers) are unknown."""
    common = ("voc", "--data-root", SAMPLES, "--predictions", VOC_ROOT / "SegmentationClass")
    new = invoke(zs_eval, *common, "--out", tmp_path / "new", "--decode-threads", "1")
    assert new.returncode == 0, new.stderr
    assert (tmp_path / "new" / "voc.json").is_file()
    for old in (("--output", tmp_path / "old"), ("--workers", "1")):
        refused = invoke(zs_eval, *common, *old)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert f"No such option: {old[0]}" in refused.stderr


def test_no_error_message_or_help_text_points_at_a_source_file():
    """A user who installed from PyPI has no evaluation/datasets.py to look at."""
    repo = Path(__file__).parents[1]
    found = []
    for path in [*repo.glob("pipeline/*.py"), *repo.glob("trainer/*.py"), *repo.glob("evaluation/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name in ("UserError", "require"):  # require(condition, message) raises UserError(message)
                texts = node.args[-1:]
            else:
                texts = [kw.value for kw in node.keywords if kw.arg == "help"]
            for text in texts:
                strings = [part.value for part in ast.walk(text) if isinstance(part, ast.Constant)]
                found += [f"{path.name}: {s}" for s in strings if isinstance(s, str) and SOURCE_FILE.search(s)]
    assert found == []


@pytest.mark.parametrize("command", [["zeroseg"], [CACHE], [TRAIN], [EVAL], [SEGMENT], ["zeroseg", "eval"]],
                         ids=" ".join)
def test_every_command_tells_its_version(command):
    from zeroseg import __version__

    result = run_cli(*command, "--version", timeout=60)
    assert result.returncode == 0, result.stderr
    name = {CACHE: "zs-cache", TRAIN: "zs-train", EVAL: "zs-eval", SEGMENT: "zs-segment"}.get(command[-1], "zs-eval")
    assert result.stdout == f"{'zeroseg' if command == ['zeroseg'] else name} {__version__}\n"
