"""The paper config, the ablations and the tiny teacher ship inside the package and are reachable by name."""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_TEACHER, invoke
from zeroseg.configs import TEACHER_SUFFIXES, TRAIN_SUFFIXES, shipped_config, shipped_names
from zeroseg.errors import UserError
from zeroseg.io import canonical_json
from zeroseg.pipeline.teacher import resolve_identity
from zeroseg.trainer.cli import main as zs_train
from zeroseg.trainer.config import build_config, read_config_file

CONFIGS = Path(__file__).parents[1] / "configs"


def test_paper_config_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shown = invoke(zs_train, "config", "--config", "zeroseg-imagenet")
    assert shown.returncode == 0, shown.stderr
    config = yaml.safe_load(shown.stdout)
    assert config["schedule"]["epochs"] == 80 and config["model"]["mask_ratio"] == 0.6
    assert config["optim"]["base_lr"] == 1.5e-4


ABLATIONS = sorted(path.stem for path in (CONFIGS / "ablations").glob("*.yaml"))
PAPER_ROWS = {"table3-grids-1234", "table4-multiscale-matching", "table5-mask-60"}  # a table's row = the paper run


def flat(values: dict) -> dict:
    """{(section, key): value} of a nested config dict."""
    return {(section, key): value for section, keys in values.items() for key, value in keys.items()}


@pytest.mark.parametrize("name", ABLATIONS)
def test_each_ablation_is_the_paper_run_with_exactly_the_keys_it_states(name):
    """An ablation file holds its base, the keys it ablates and its run directory; the keys it states are the
    differences from the paper config (at the paper's values for a table's row that is the paper run)."""
    own = yaml.safe_load((CONFIGS / "ablations" / f"{name}.yaml").read_text())
    assert own.pop("_base_") == "zeroseg-imagenet"
    assert own["run"].pop("dir") == f"runs/ablations/{name}" and not own.pop("run")
    stated = flat(own)
    paper = flat(build_config(read_config_file("zeroseg-imagenet"), []).to_dict())
    ablation = flat(build_config(read_config_file(name), []).to_dict())
    assert stated and set(stated) <= set(paper)
    differs = {key for key in paper if paper[key] != ablation[key]}
    assert differs == {("run", "dir")} | (set() if name in PAPER_ROWS else set(stated))
    assert all(ablation[key] == value for key, value in stated.items())


def test_zs_train_config_prints_an_ablation_merged_over_the_paper_config():
    shown = invoke(zs_train, "config", "--config", "table4-base")
    assert shown.returncode == 0, shown.stderr
    config = yaml.safe_load(shown.stdout)
    assert (config["loss"]["w_match"], config["loss"]["grids"]) == (0.0, [1])  # the ablation's
    paper = (config["model"]["mask_ratio"], config["optim"]["base_lr"], config["data"]["batch_size"])
    assert paper == (0.6, 1.5e-4, 512)  # the paper config's
    assert (config["schedule"]["epochs"], config["run"]["dir"]) == (80, "runs/ablations/table4-base")
    assert "_base_" not in config


def test_unknown_config_name_lists_the_shipped_ones():
    assert {"zeroseg-imagenet", "tiny-cpu", "table4-base", "w-match-2"} <= set(shipped_names(TRAIN_SUFFIXES))
    with pytest.raises(UserError, match="shipped with zeroseg, by name: table3-grids-1, .*zeroseg-imagenet"):
        read_config_file("zeroseg-imagenett")


def test_tiny_teacher_by_name_is_the_test_fixture():
    shipped = shipped_config("zs-tiny-clip", TEACHER_SUFFIXES)
    assert json.loads(shipped.read_text()) == json.loads(TINY_TEACHER.read_text())
    identity = resolve_identity("zs-tiny-clip", "none")
    assert identity.model == "zs-tiny-clip" and identity.config == canonical_json(json.loads(shipped.read_text()))
