"""zs-train's configuration, lr schedule and optimizer groups (no store, no training)."""

import math
import os
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import invoke
from zeroseg.errors import UserError
from zeroseg.trainer.cli import main as zs_train
from zeroseg.trainer.config import TrainConfig, build_config, config_yaml, read_config_file
from zeroseg.trainer.losses import LossConfig
from zeroseg.trainer.model import ZeroSeg
from zeroseg.trainer.model_config import model_preset
from zeroseg.trainer.optim import Schedule, decay_split, make_optimizer, make_schedule, peak_lr

CONFIGS = Path(__file__).parent.parent / "configs"


def test_defaults_are_the_papers():
    cfg = build_config({}, [])
    assert cfg == TrainConfig()
    assert (cfg.preset, cfg.model) == ("base", model_preset("base"))
    assert (cfg.optim.base_lr, cfg.optim.betas, cfg.optim.weight_decay) == (1.5e-4, (0.9, 0.95), 0.05)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (80, 20)
    assert LossConfig().l1_reduction == "mean"


def test_file_then_set_then_explicit_options(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  preset: tiny\n  mask_ratio: 0.5\noptim:\n  lr: 1e-3\n")
    (tmp_path / "a.toml").write_text('[model]\npreset = "tiny"\nmask_ratio = 0.5\n[optim]\nlr = 1e-3\n')
    for name in ("a.yaml", "a.toml"):
        cfg = build_config(
            read_config_file(tmp_path / name),
            ["optim.lr=2e-3", "loss.grids=[1, 3]", "optim.clip_grad=1", "schedule.steps=5"],
            {"schedule.steps": 7, "data.store": "s"},
        )
        assert cfg.preset == "tiny" and cfg.model.embed_dim == 32 and cfg.model.mask_ratio == 0.5
        assert (cfg.optim.lr, cfg.optim.clip_grad, cfg.loss.grids) == (2e-3, 1.0, (1, 3))
        assert (cfg.schedule.steps, cfg.data.store) == (7, "s")
    assert build_config(yaml.safe_load(config_yaml(cfg)), []) == cfg  # the saved config.yaml round-trips


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], r"unknown config key 'optim.lrr' \(optim keys: base_lr, lr,"),
        (["training.lr=1"], r"unknown config section in 'training.lr'"),
        (["data.batch_size=eight"], r"config key 'data.batch_size' expects int, got 'eight'"),
        (["data.batch_size=0"], r"^data.batch_size must be positive, got 0$"),
        (["model.preset=huge"], r"model.preset 'huge' is not one of base, tiny"),
        (["model.patch_size=5"], r"^model.image_size 224 is not a multiple of model.patch_size 5$"),
        (["loss.l1_reduction=max"], r"config key 'loss.l1_reduction' expects"),
        (["optim.betas=[0.9]"], r"config key 'optim.betas' expects"),
        (["lr=1"], r"--set takes section.key=value"),
        (["model.preset=tiny", "model.mask_ratio=0.99"], r"^model.mask_ratio 0.99 keeps none of the 16 patches$"),
        (["loss.w_match=-1"], r"^loss.w_match must be >= 0, got -1.0$"),
        (["optim.betas=[0.9, 1.5]"], r"^optim.betas must be two numbers in \[0, 1\), got \(0.9, 1.5\)$"),
    ],
)
def test_bad_keys_and_values_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        build_config({}, overrides)


def test_example_configs_are_valid():
    files = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("*.toml"))
    assert files
    for path in files:
        build_config(read_config_file(path), [])


def test_lr_warms_up_linearly_then_follows_a_half_cosine():
    schedule = Schedule(total_steps=110, warmup_steps=10, peak_lr=1.0, min_lr=0.1)
    assert [schedule.lr(s) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert schedule.lr(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule.lr(110) == pytest.approx(0.1)
    assert all(schedule.lr(s) >= schedule.lr(s + 1) for s in range(10, 110))


def test_schedule_length_from_epochs_and_the_lr_scaling_rule():
    cfg = build_config({}, ["optim.accum_steps=2"])
    schedule = make_schedule(cfg.schedule, cfg.optim, num_samples=1_281_167, effective_batch=4096)
    assert schedule.total_steps == math.ceil(80 * 1_281_167 / 4096)
    assert schedule.warmup_steps == round(20 * 1_281_167 / 4096)
    assert schedule.peak_lr == pytest.approx(1.5e-4 * 16)
    assert peak_lr(build_config({}, ["optim.lr=0.01"]).optim, 4096) == 0.01
    with pytest.raises(UserError, match=r"the warm-up \(25 steps\) does not end before the run \(10 steps\)"):
        make_schedule(build_config({}, ["schedule.steps=10"]).schedule, cfg.optim, 10, 8)


def test_weight_decay_covers_every_matrix_and_the_learned_tokens_as_mae_and_groupvit():
    model = ZeroSeg(model_preset("tiny"))
    optimizer = make_optimizer(model, build_config({}, []).optim)
    decayed, plain = optimizer.param_groups
    assert (decayed["weight_decay"], plain["weight_decay"], optimizer.defaults["betas"]) == (0.05, 0.0, (0.9, 0.95))
    decay_names, plain_names = decay_split(model)
    tokens = {"mask_token", "grouping_stages.0.group_tokens", "grouping_stages.1.group_tokens"}
    assert tokens <= set(decay_names) and "blocks.0.attn.qkv.weight" in decay_names
    assert "norm.weight" in plain_names and "blocks.0.attn.qkv.bias" in plain_names
    params = dict(model.named_parameters())
    assert all(params[name].ndim >= 2 for name in decay_names)
    assert all(params[name].ndim <= 1 for name in plain_names)
    assert [id(p) for p in decayed["params"]] == [id(params[name]) for name in decay_names]
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))

    exempt = build_config({}, ["optim.decay_tokens=false"]).optim
    assert exempt.decay_tokens is False
    decay_names, plain_names = decay_split(model, exempt.decay_tokens)
    assert tokens <= set(plain_names) and tokens.isdisjoint(decay_names)
    assert len(make_optimizer(model, exempt).param_groups[1]["params"]) == len(plain_names)


def test_a_config_overlays_its_bases_section_by_section_and_key_by_key(tmp_path):
    """GroupViT's load_config: the base is read (its own base first), then the file is merged over it; a
    section merges key by key, a list replaces the base's list; a base is a path relative to the file."""
    (tmp_path / "base.yaml").write_text(
        "model:\n  preset: tiny\n  mask_ratio: 0.5\nloss:\n  grids: [1, 2, 3]\n  w_match: 2\noptim:\n  lr: 0.001\n"
    )
    (tmp_path / "mid.toml").write_text('_base_ = "base.yaml"\n[loss]\ngrids = [4]\n[optim]\nweight_decay = 0.1\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "top.yaml").write_text("_base_: ../mid.toml\nloss:\n  w_match: 0.5\n")
    values = read_config_file(tmp_path / "sub" / "top.yaml")
    assert values == {
        "model": {"preset": "tiny", "mask_ratio": 0.5},
        "loss": {"grids": [4], "w_match": 0.5},
        "optim": {"lr": 0.001, "weight_decay": 0.1},
    }
    cfg = build_config(values, [])
    assert (cfg.model.embed_dim, cfg.loss.grids, cfg.loss.w_match, cfg.optim.lr) == (32, (4,), 0.5, 1e-3)


def test_a_shipped_config_is_a_base_by_name(tmp_path):
    (tmp_path / "mine.yaml").write_text("_base_: zeroseg-imagenet\nmodel:\n  mask_ratio: 0.75\n")
    mine = build_config(read_config_file(tmp_path / "mine.yaml"), [])
    paper = build_config(read_config_file(CONFIGS / "zeroseg-imagenet.yaml"), [])
    assert mine.model.mask_ratio == 0.75 and mine.model.embed_dim == 768
    assert (mine.loss, mine.data, mine.optim, mine.schedule, mine.run) == (
        paper.loss, paper.data, paper.optim, paper.schedule, paper.run
    )


def test_a_cycle_of_bases_is_refused_in_one_line_naming_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    (tmp_path / "self.yaml").write_text("_base_: self.yaml\n")
    a, b = (re.escape(str((tmp_path / name).resolve())) for name in ("a.yaml", "b.yaml"))
    with pytest.raises(UserError, match=f"^config file '{a}' has a cycle of bases: {a} -> {b} -> {a}$"):
        read_config_file(tmp_path / "a.yaml")
    with pytest.raises(UserError, match="has a cycle of bases: .*self.yaml -> .*self.yaml$"):
        read_config_file(tmp_path / "self.yaml")
    shown = invoke(zs_train, "config", "--config", tmp_path / "a.yaml")
    assert shown.returncode == 2 and shown.stderr.count("\n") == 1 and "cycle of bases" in shown.stderr


def test_an_unknown_or_malformed_base_is_refused_in_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: zeroseg-imagenett\n")
    message = rf"^base 'zeroseg-imagenett' of config file '{tmp_path / 'a.yaml'}' does not exist \(configs shipped"
    with pytest.raises(UserError, match=message):
        read_config_file(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("_base_: missing.toml\n")
    with pytest.raises(UserError, match="^base 'missing.toml' of config file .*b.yaml' does not exist"):
        read_config_file(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("_base_: [a.yaml, b.yaml]\n")
    with pytest.raises(UserError, match=r"c.yaml': _base_ must be one config name or path, got \['a.yaml'"):
        read_config_file(tmp_path / "c.yaml")


def test_every_ablation_config_builds_and_changes_only_what_it_ablates():
    configs = Path(__file__).parents[1] / "configs"
    reference = build_config(read_config_file(configs / "zeroseg-imagenet.yaml"), [])
    built = {path.stem: build_config(read_config_file(path), []) for path in (configs / "ablations").glob("*.yaml")}
    assert len(built) == 22 and len({cfg.run.dir for cfg in built.values()}) == 22
    assert built["table3-grids-13"].loss.grids == (1, 3) and built["table3-grids-13"].loss.matching_grids == (3,)
    base = built["table4-base"].loss
    assert (base.distillation_grids, base.matching_grids, base.w_match) == ((1,), (), 0.0)
    matching = built["table4-matching"].loss
    assert (matching.distillation_grids, matching.matching_grids) == ((1,), (2, 3, 4))
    assert built["table4-multiscale"].loss.w_match == 0.0 and built["table4-multiscale"].loss.grids == (1, 2, 3, 4)
    assert sorted(cfg.model.mask_ratio for name, cfg in built.items() if name.startswith("table5")) == [
        0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
    ]  # fmt: skip
    assert sorted(cfg.loss.w_match for name, cfg in built.items() if name.startswith("w-match")) == [0.5, 2, 4, 8, 16]
    for cfg in built.values():
        assert (cfg.optim, cfg.schedule, cfg.data) == (reference.optim, reference.schedule, reference.data)


def test_the_default_loader_workers_fit_the_cores_this_process_may_use():
    cores = len(os.sched_getaffinity(0))
    assert build_config({}, [], {"model.preset": "tiny"}).data.workers == min(8, cores)
    assert build_config({}, ["data.workers=3"]).data.workers == 3
