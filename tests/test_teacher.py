"""The teacher is never silently wrong: QuickGELU flags and refusals, hf-hub:/local-dir: teachers, a timm
image tower through cache, train and eval, config-JSON teachers stored by content, the device line."""

import json
import shutil
import zipfile
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch
from open_clip.factory import _find_checkpoint_in_dir

from tests.conftest import FIXTURES, SAMPLES, TINY_TEACHER, invoke, run_cli
from zeroseg.errors import UserError
from zeroseg.evaluation.cli import main as zs_eval
from zeroseg.evaluation.loading import ModelOptions, _text_teacher
from zeroseg.io import sha256_file
from zeroseg.pipeline.cli import main as zs_cache
from zeroseg.pipeline.store import FeatureStore
from zeroseg.pipeline.teacher import BOTH_KINDS, Teacher, create_clip, resolve_identity
from zeroseg.pipeline.teacher_identity import TeacherIdentity, parse_teacher_name
from zeroseg.trainer.cli import main as zs_train

TIMM_TEACHER = FIXTURES / "zs-tiny-timm-clip.json"
CPU = torch.device("cpu")
COMMON = ("--device", "cpu", "--image-size", "32", "--grids", "1,2", "--no-progress")


def activations(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}


def one_line_error(result, *fragments: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


def tiny_with(tmp_path: Path, name: str, **changes) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**json.loads(TINY_TEACHER.read_text()), **changes}))
    return path


def test_a_teacher_name_is_parsed_once_into_schema_and_id(tmp_path):
    assert parse_teacher_name("ViT-L-14") == ("open_clip", "ViT-L-14")
    assert parse_teacher_name("hf-hub:org/repo") == ("hf-hub", "org/repo")
    assert parse_teacher_name("local-dir:./folder") == ("local-dir", "./folder")
    shipped = parse_teacher_name("zs-tiny-clip")  # a config shipped with zeroseg: its file
    assert shipped[0] == "config" and json.loads(Path(shipped[1]).read_text()) == json.loads(TINY_TEACHER.read_text())
    assert parse_teacher_name("mine.json") == ("config", "mine.json")
    assert parse_teacher_name(str(tmp_path / "mine")) == ("config", str(tmp_path / "mine"))
    with pytest.raises(UserError, match="teacher 'hf-hub:' names nothing after 'hf-hub:'"):
        parse_teacher_name("hf-hub:")


def test_a_folder_teacher_records_the_weights_file_open_clip_picks(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": json.loads(TINY_TEACHER.read_text())}))
    for name in ("a.bin", "z.safetensors", "model.pth", "notes.txt"):
        (tmp_path / name).write_text(name)
    picked, opened = [], []  # ours; open_clip's own pick, the file it loads (a private function: a guard on drift)
    for leave_out in (None, "model.pth"):  # open_clip's preferred names first, then .safetensors, then by name
        if leave_out:
            (tmp_path / leave_out).unlink()
        picked.append(Path(resolve_identity(f"local-dir:{tmp_path}").pretrained).name)
        opened.append(Path(_find_checkpoint_in_dir(tmp_path)).name)
    assert picked == opened == ["model.pth", "z.safetensors"]


def test_weights_file_of_an_openai_architecture_needs_a_flag(photos, tmp_path):
    assert {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "RN50"} <= BOTH_KINDS
    weights = tmp_path / "open_clip_pytorch_model.bin"
    weights.write_bytes(b"refused before it is read")
    refused = invoke(zs_cache, "build", photos, "--store", tmp_path / "s", "--teacher", "ViT-B-32",
                     "--pretrained", weights, *COMMON)  # fmt: skip
    one_line_error(refused, "pass --quick-gelu for OpenAI weights, --no-quick-gelu for the others")
    assert not (tmp_path / "s").exists()
    assert resolve_identity("ViT-B-32", str(weights), quick_gelu=True).quick_gelu is True
    assert resolve_identity("ViT-B-32", str(weights), quick_gelu=False).quick_gelu is False
    assert resolve_identity("ViT-B-32-quickgelu", str(weights)).quick_gelu is True  # the name is certain


def test_openai_torchscript_archive_and_tags_switch_quick_gelu_on(tmp_path):
    archive = tmp_path / "ViT-B-32.pt"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("ViT-B-32/code/__torch__/model.py", "")
    assert resolve_identity("ViT-B-32", str(archive)).quick_gelu is True
    assert resolve_identity("ViT-B-32", None).pretrained == "openai"
    assert resolve_identity("ViT-B-32", None).quick_gelu is True


def test_the_recorded_activation_is_the_one_built(tmp_path):
    """A config that says quick_gelu and --no-quick-gelu: the recorded False is the GELU tower built."""
    quick = tiny_with(tmp_path, "zs-tiny-quick", quick_gelu=True)
    automatic = resolve_identity(str(quick), "none")
    assert automatic.quick_gelu is True and activations(create_clip(automatic, CPU)) == {"QuickGELU"}
    forced_off = resolve_identity(str(quick), "none", quick_gelu=False)
    assert activations(create_clip(forced_off, CPU)) == {"GELU"}
    forced_on = resolve_identity(str(TINY_TEACHER), "none", quick_gelu=True)
    assert activations(create_clip(forced_on, CPU)) == {"QuickGELU"}


def test_quick_gelu_in_the_first_line_the_store_and_inspect(photos, tmp_path):
    built = invoke(zs_cache, "build", photos, "--store", tmp_path / "s", "--teacher", TINY_TEACHER,
                   "--pretrained", "none", "--quick-gelu", *COMMON)  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert built.stderr.splitlines()[0] == (
        f"caching 10 new images of {photos} in 1 shards on cpu, "
        "teacher zs-tiny-clip pretrained=none (random weights) quick_gelu=True"
    )
    assert FeatureStore.open(tmp_path / "s").meta.teacher.quick_gelu is True
    shown = invoke(zs_cache, "inspect", tmp_path / "s")
    assert "teacher    zs-tiny-clip pretrained=none (random weights) quick_gelu=True" in shown.stdout
    again = invoke(zs_cache, "build", photos, "--store", tmp_path / "s", "--teacher", TINY_TEACHER,
                   "--pretrained", "none", "--no-quick-gelu", *COMMON)  # fmt: skip
    one_line_error(again, "quick_gelu=True", "quick_gelu=False", "use another --store")


def write_open_clip_folder(folder: Path, seed: int, **model_changes) -> Path:
    """What open_clip pushes to the hub: open_clip_config.json (model_cfg + preprocess_cfg) and the weights."""
    folder.mkdir(parents=True)
    model_cfg = {**json.loads(TINY_TEACHER.read_text()), **model_changes}
    preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    resolve_identity(str(TINY_TEACHER), "none")  # registers zs-tiny-clip with open_clip
    torch.manual_seed(seed)
    model = open_clip.create_model("zs-tiny-clip")
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder / "open_clip_pytorch_model.bin"


def hub_cache_entry(cache: Path, repo: str, folder: Path) -> None:
    """`folder` as a Hugging Face cache entry: models--ORG--REPO/snapshots/<revision>/..., refs/main."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, entry / "snapshots" / revision)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(revision)


def test_hub_repos_tagged_openai_get_quick_gelu(tmp_path, monkeypatch):
    write_open_clip_folder(tmp_path / "folder", seed=3)
    for repo in ("zs-test/tiny-clip.openai", "zs-test/tiny-clip.laion2b"):
        hub_cache_entry(tmp_path / "hub", repo, tmp_path / "folder")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_identity("hf-hub:zs-test/tiny-clip.openai").quick_gelu is True
    assert resolve_identity("hf-hub:zs-test/tiny-clip.laion2b").quick_gelu is False
    assert resolve_identity("hf-hub:zs-test/tiny-clip.openai", quick_gelu=False).quick_gelu is False


def test_local_dir_and_hf_hub_teachers_load_their_own_weights(photos, tmp_path, monkeypatch):
    weights = write_open_clip_folder(tmp_path / "folder", seed=7, quick_gelu=True)
    local = invoke(zs_cache, "build", photos, "--store", tmp_path / "local", "--teacher",
                   f"local-dir:{tmp_path / 'folder'}", *COMMON)  # fmt: skip
    assert local.returncode == 0, local.stderr
    meta = FeatureStore.open(tmp_path / "local").meta
    assert meta.teacher.model == f"local-dir:{(tmp_path / 'folder').resolve()}"
    assert meta.teacher.pretrained == str(weights.resolve()) and meta.teacher.quick_gelu is True
    assert meta.teacher.weights_sha256 == sha256_file(weights)
    assert meta.preprocessing.mean == (0.5, 0.5, 0.5) and meta.preprocessing.std == (0.25, 0.25, 0.25)

    hub_cache_entry(tmp_path / "hub", "zs-test/tiny-clip", tmp_path / "folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = run_cli("zeroseg.pipeline.cli", "build", photos, "--store", tmp_path / "hub-store",
                  "--teacher", "hf-hub:zs-test/tiny-clip", *COMMON)  # fmt: skip
    assert hub.returncode == 0, hub.stderr
    assert "teacher hf-hub:zs-test/tiny-clip pretrained=" in hub.stderr.splitlines()[0]
    hub_store, local_store = FeatureStore.open(tmp_path / "hub-store"), FeatureStore.open(tmp_path / "local")
    assert hub_store.meta.teacher.weights_sha256 == sha256_file(weights)
    np.testing.assert_array_equal(hub_store.features[:], local_store.features[:])

    random = invoke(zs_cache, "build", photos, "--store", tmp_path / "random", "--teacher", TINY_TEACHER,
                    "--pretrained", "none", *COMMON)  # fmt: skip
    assert random.returncode == 0 and not np.allclose(FeatureStore.open(tmp_path / "random").features[:],
                                                      local_store.features[:], atol=1e-2)  # fmt: skip
    pretrained = invoke(zs_cache, "build", photos, "--store", tmp_path / "x", "--teacher",
                        f"local-dir:{tmp_path / 'folder'}", "--pretrained", weights, *COMMON)  # fmt: skip
    one_line_error(pretrained, "brings its own weights: leave it out")
    missing = invoke(zs_cache, "build", photos, "--store", tmp_path / "y", "--teacher", "hf-hub:zs-test/absent",
                     *COMMON)  # fmt: skip
    one_line_error(missing, "teacher 'hf-hub:zs-test/absent'", "Hugging Face cache")
    (tmp_path / "no-weights").mkdir()
    shutil.copy(tmp_path / "folder" / "open_clip_config.json", tmp_path / "no-weights")
    unweighted = invoke(zs_cache, "build", photos, "--store", tmp_path / "z", "--teacher",
                        f"local-dir:{tmp_path / 'no-weights'}", *COMMON)  # fmt: skip
    one_line_error(unweighted, "no weights")
    assert not any((tmp_path / name).exists() for name in ("x", "y", "z"))


def test_timm_tower_through_cache_train_and_eval_from_the_recorded_config(photos, tmp_path):
    """A config JSON whose image tower is a timm model; the JSON is gone before training and evaluation."""
    config = tmp_path / "configs" / TIMM_TEACHER.name
    config.parent.mkdir()
    shutil.copy(TIMM_TEACHER, config)
    built = invoke(zs_cache, "build", photos, "--store", tmp_path / "store", "--teacher", config,
                   "--pretrained", "none", "--batch-size", "5", *COMMON, "--grids", "1,2,3,4")  # fmt: skip
    assert built.returncode == 0, built.stderr
    meta = FeatureStore.open(tmp_path / "store").meta
    assert meta.embed_dim == 32 and meta.preprocessing.view_size == 32
    assert json.loads(meta.teacher.config) == json.loads(TIMM_TEACHER.read_text())
    shutil.rmtree(config.parent)

    trained = invoke(
        zs_train, "run", "--store", tmp_path / "store", "--run-dir", tmp_path / "run", "--preset", "tiny",
        "--steps", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress",
        "--set", "schedule.warmup_steps=1",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("step-*.pt")
    recorded = torch.load(checkpoint, map_location="cpu", weights_only=False)["store"]["teacher"]
    assert recorded == meta.teacher.to_dict()

    evaluated = invoke(zs_eval, "voc", "--data-root", SAMPLES, "--checkpoint", checkpoint, "--text-cache",
                       tmp_path / "text", "--out", tmp_path / "res", "--short-side", "64", "--crop-size", "64",
                       "--stride", "32", "--no-progress")  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    document = json.loads((tmp_path / "res" / "voc.json").read_text())
    assert 0 <= document["mIoU"] <= 100 and document["config"]["teacher_matches_checkpoint"] is True


def test_a_config_path_the_user_passes_wins_over_the_recorded_one(tmp_path):
    path = tiny_with(tmp_path, "zs-tiny-recorded", embed_dim=16)
    recorded = resolve_identity(str(path), "none")
    assert TeacherIdentity.from_dict(recorded.to_dict(), "test") == recorded  # the dict a store / checkpoint holds
    without_config = {key: value for key, value in recorded.to_dict().items() if key != "config"}
    for older in ({**recorded.to_dict(), "config": str(path)}, without_config):
        with pytest.raises(UserError, match="test: 'config' is not a model config"):
            TeacherIdentity.from_dict(older, "test")  # one format: the config's content, recorded
    assert _text_teacher(recorded, ModelOptions(checkpoint="run")) == recorded
    other = _text_teacher(recorded, ModelOptions(checkpoint="run", teacher=str(TINY_TEACHER), pretrained="none"))
    assert other.model == "zs-tiny-clip" and json.loads(other.config) == json.loads(TINY_TEACHER.read_text())
    assert Teacher(recorded, CPU).embed_dim == 16 and Teacher(other, CPU).embed_dim == 32
    (tmp_path / "edited").mkdir()
    edited = resolve_identity(str(tiny_with(tmp_path / "edited", "zs-tiny-recorded", embed_dim=24)), "none")
    assert not edited.same_teacher(recorded)  # same name, other content: another teacher


def test_a_build_whose_teacher_fails_leaves_nothing(photos, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    args = ("--teacher", TINY_TEACHER, "--pretrained", garbage, *COMMON)
    one_line_error(invoke(zs_cache, "build", photos, "--store", tmp_path / "new", *args), "could not load")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    one_line_error(invoke(zs_cache, "build", photos, "--store", tmp_path / "empty", *args), "could not load")
    assert list((tmp_path / "empty").iterdir()) == []


def test_unknown_or_broken_teachers_are_one_line_errors(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(UserError, match="is not valid JSON"):
        resolve_identity(str(tmp_path / "broken.json"), "none")
    with pytest.raises(UserError, match="is not an open_clip config"):
        resolve_identity(str(tmp_path / "other.json"), "none")
    with pytest.raises(UserError, match="no open_clip_config.json"):
        resolve_identity(f"local-dir:{tmp_path}")


def test_a_tower_that_cannot_take_its_configured_size_is_refused_when_built(tmp_path):
    config = json.loads(TIMM_TEACHER.read_text())
    config["vision_cfg"]["image_size"] = 100  # not a multiple of test_vit's 16 px patches
    (tmp_path / "zs-tiny-timm-100.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="its image tower fails on 100px input"):
        Teacher(resolve_identity(str(tmp_path / "zs-tiny-timm-100.json"), "none"), CPU)
