"""The paper config, the ablations and the tiny teacher ship inside the package and are reachable by name."""

import json

import pytest
import yaml

from tests.conftest import TINY_TEACHER, invoke
from zeroseg.configs import TEACHER_SUFFIXES, TRAIN_SUFFIXES, shipped_config, shipped_names
from zeroseg.errors import UserError
from zeroseg.pipeline.teacher import canonical_json, resolve_identity
from zeroseg.trainer.cli import main as zs_train
from zeroseg.trainer.config import build_config, read_config_file


def test_paper_config_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shown = invoke(zs_train, "config", "--config", "zeroseg-imagenet")
    assert shown.returncode == 0, shown.stderr
    config = yaml.safe_load(shown.stdout)
    assert config["schedule"]["epochs"] == 80 and config["model"]["mask_ratio"] == 0.6
    assert config["optim"]["base_lr"] == 1.5e-4


@pytest.mark.parametrize(
    ("name", "differs"),
    [
        ("table4-base", {("loss", "w_match"): 0.0, ("loss", "grids"): (1,)}),
        ("table4-multiscale", {("loss", "w_match"): 0.0}),
        ("table3-grids-13", {("loss", "grids"): (1, 3)}),
        ("table5-mask-00", {("model", "mask_ratio"): 0.0}),
    ],
)
def test_each_ablation_is_the_paper_run_with_its_change(name, differs):
    paper = build_config(read_config_file("zeroseg-imagenet"), [])
    ablation = build_config(read_config_file(name), [])
    for (section, key), value in differs.items():
        assert getattr(getattr(ablation, section), key) == value
    for section in ("model", "loss", "data", "optim", "schedule"):
        mine, theirs = vars(getattr(ablation, section)), vars(getattr(paper, section))
        changed = {key for key in mine if mine[key] != theirs[key]}
        assert changed == {key for (where, key) in differs if where == section}
    assert ablation.run.dir == f"runs/ablations/{name}"


def test_unknown_config_name_lists_the_shipped_ones():
    assert {"zeroseg-imagenet", "tiny-cpu", "table4-base", "w-match-2"} <= set(shipped_names(TRAIN_SUFFIXES))
    with pytest.raises(UserError, match="shipped with zeroseg, by name: table3-grids-1, .*zeroseg-imagenet"):
        read_config_file("zeroseg-imagenett")


def test_tiny_teacher_by_name_is_the_test_fixture():
    shipped = shipped_config("zs-tiny-clip", TEACHER_SUFFIXES)
    assert json.loads(shipped.read_text()) == json.loads(TINY_TEACHER.read_text())
    identity = resolve_identity("zs-tiny-clip", "none")
    assert identity.model == "zs-tiny-clip" and identity.config == canonical_json(json.loads(shipped.read_text()))
