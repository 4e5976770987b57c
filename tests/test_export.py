"""`zs-train export` and the Python API: the exported folder gives the checkpoint's outputs, loads into timm,
and Segmenter.from_pretrained / zs-segment --checkpoint read it."""

import json
import os
import shutil
import stat

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tests.conftest import PHOTOS, TINY_TEACHER, flip_byte, invoke, killed_writer, tiny_checkpoint, tmpfs
from zeroseg.errors import UserError
from zeroseg.evaluation.pretrained import Segmenter
from zeroseg.evaluation.segment_cli import main as zs_segment
from zeroseg.evaluation.windows import Geometry
from zeroseg.pipeline.teacher_identity import TeacherIdentity
from zeroseg.trainer.cli import main as zs_train
from zeroseg.trainer.export import EXPORT_FORMAT, document_digest, load_export, load_trained_model
from zeroseg.trainer.vit import interpolate_pos_embed

GEOMETRY = Geometry("whole", 64, 128, 64, 32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 2-step tiny run on a store of the fixture photos, exported with `zs-train export`."""
    root = tmp_path_factory.mktemp("export")
    tiny_checkpoint(root)
    exported = invoke(zs_train, "export", root / "run", "--out", root / "exported")
    assert exported.returncode == 0, exported.stderr
    return {"root": root, "run": root / "run", "export": root / "exported"}


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def test_export_holds_weights_and_a_config_without_absolute_paths(trained):
    export = trained["export"]
    files = sorted(str(p.relative_to(export)) for p in export.rglob("*") if p.is_file())
    assert files == ["README.md", "config.json", "model.safetensors", "teacher/zs-tiny-clip.json"]
    document = json.loads((export / "config.json").read_text())
    assert document["format"] == "zeroseg-export-1" and document["step"] == 2
    assert document["teacher"]["config"] == "teacher/zs-tiny-clip.json" and document["teacher"]["pretrained"] is None
    assert {"mean", "std", "image_size"} <= set(document["preprocessing"])
    assert not [text for text in _strings(document) if text.startswith("/") or str(trained["root"]) in text]


def test_exported_model_gives_the_checkpoints_outputs(trained):
    original, recorded = load_trained_model(trained["run"])
    exported, meta = load_trained_model(trained["export"])
    teacher = TeacherIdentity.from_dict(meta["store"]["teacher"], "export")
    trained_with = TeacherIdentity.from_dict(recorded["store"]["teacher"], "checkpoint")
    assert meta["step"] == 2 and teacher.config == trained_with.config
    assert json.loads(teacher.config)["embed_dim"] == json.loads(TINY_TEACHER.read_text())["embed_dim"]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = original(images, mask_ratio=0.0), exported(images, mask_ratio=0.0)
    assert torch.equal(want.g, got.g) and torch.equal(want.z, got.z)


def test_encoder_keys_load_strictly_into_timm_vision_transformer(trained):
    student, _ = load_export(trained["export"])
    cfg = student.cfg
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, class_token=False, pos_embed="none", global_pool="",
        num_classes=0,
    )  # fmt: skip
    encoder_parts = ("patch_embed", "blocks", "norm")
    encoder = {key: value for key, value in student.state_dict().items() if key.split(".")[0] in encoder_parts}
    vit.load_state_dict(encoder, strict=True)
    vit.eval()
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    grid = student.base_grid
    with torch.inference_mode():
        want = student.forward_encoder(images, mask_ratio=0.0)[0]  # (B, L, D)
        tokens = vit.patch_embed(images) + interpolate_pos_embed(student.pos_embed, grid, grid)
        got = vit.norm(vit.blocks(tokens))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_segmenter_from_pretrained_labels_only_the_given_classes(trained, tmp_path):
    image = Image.open(PHOTOS[0]).convert("RGB")
    kwargs = {"device": "cpu", "text_cache": tmp_path / "text", "geometry": GEOMETRY}
    from_export = Segmenter.from_pretrained(trained["export"], **kwargs)
    from_run = Segmenter.from_pretrained(trained["run"], **kwargs)
    assert from_export.loaded.description["teacher_matches_checkpoint"]
    result = from_export(image, classes=["cat", "dog"])
    assert result.class_names == ("background", "cat", "dog")
    assert result.labels.shape == (image.height, image.width) and set(np.unique(result.labels)) <= {1, 2}
    assert np.array_equal(result.labels, from_run(np.asarray(image), classes=["cat", "dog"]).labels)
    assert sum(segment["pixel_share"] for segment in result.segments) == pytest.approx(1.0)
    assert all(segment["class"] in ("cat", "dog") and 0 <= segment["score"] <= 1 for segment in result.segments)
    best_segment_kept = from_export(PHOTOS[0], classes=["cat", "dog"], background=1.01)
    assert (best_segment_kept.labels != 0).any()  # groupvit: the best segment is never background
    softmax_rule = Segmenter.from_pretrained(trained["export"], rule="softmax", **kwargs)
    everything_background = softmax_rule(PHOTOS[0], classes=["cat", "dog"], background=1.01)
    assert (everything_background.labels == 0).all()
    assert everything_background.segments == [{"class": "background", "index": 0, "pixel_share": 1.0, "score": None}]
    with pytest.raises(ValueError, match="distinct"):
        from_export(image, classes=["cat", "cat"])


def test_zs_segment_reads_an_exported_folder(trained, tmp_path):
    out = invoke(
        zs_segment, PHOTOS[0], "--checkpoint", trained["export"], "--classes", "cat,dog", "--out", tmp_path / "out",
        "--text-cache", tmp_path / "text", "--short-side", "64", "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "out" / "zs-segment.json").read_text())["step"] == 2


def test_damaged_export_is_one_error_naming_the_file(trained, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(trained["export"], damaged)
    weights, config = damaged / "model.safetensors", damaged / "config.json"
    flip_byte(weights, weights.stat().st_size - 1)  # an exponent bit of the last weight: loads without a word
    with pytest.raises(UserError, match=f"^exported file {weights} is damaged: its sha256 differs from the one in "):
        load_trained_model(damaged)
    shutil.copy(trained["export"] / "model.safetensors", weights)
    document = json.loads(config.read_text())
    document["preprocessing"]["mean"][0] += 0.25
    config.write_text(json.dumps(document, indent=1))
    with pytest.raises(UserError, match=f"^exported model config {config} is damaged: its contents do not match"):
        load_trained_model(damaged)
    del document["preprocessing"]
    config.write_text(json.dumps(document))
    with pytest.raises(UserError, match=f"^{config} has no key 'preprocessing' \\(damaged"):
        load_trained_model(damaged)
    weights.unlink()
    config.write_text((trained["export"] / "config.json").read_text())
    with pytest.raises(UserError, match=f"^exported file {weights} cannot be read: No such file"):
        load_trained_model(damaged)


def test_paths_in_an_export_are_resolved_inside_it(trained, tmp_path):
    hostile = tmp_path / "hostile"
    shutil.copytree(trained["export"], hostile)
    document = json.loads((hostile / "config.json").read_text())
    for key, name in (("config", "../../../../etc/passwd"), ("weights_file", "/etc/passwd")):
        changed = {**document, "teacher": {**document["teacher"], key: name}}
        (hostile / "config.json").write_text(json.dumps({**changed, "checksum": document_digest(changed)}))
        with pytest.raises(UserError, match=f"^{hostile / 'config.json'} names '{name}', which lies outside"):
            load_trained_model(hostile)
    changed = {**document, "files": {**document["files"], "../../../../etc/passwd": "0" * 64}}
    (hostile / "config.json").write_text(json.dumps({**changed, "checksum": document_digest(changed)}))
    with pytest.raises(UserError, match="names '../../../../etc/passwd', which lies outside"):
        load_trained_model(hostile)


def test_an_export_of_another_format_is_refused_in_one_line(trained, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(trained["export"], older)
    document = json.loads((older / "config.json").read_text())
    (older / "config.json").write_text(json.dumps({**document, "format": "zeroseg-export-0"}))
    refusal = f"is an export of format 'zeroseg-export-0'; this zeroseg reads format {EXPORT_FORMAT}$"
    with pytest.raises(UserError, match=f"^{older / 'config.json'} {refusal}"):
        load_trained_model(older)
    (older / "config.json").write_text(json.dumps({key: value for key, value in document.items() if key != "format"}))
    with pytest.raises(UserError, match="config.json is not a zeroseg export: it has no format$"):
        load_trained_model(older)


def test_an_export_removes_what_a_killed_export_left_in_its_folder(trained, tmp_path):
    out = tmp_path / "again"
    killed = [killed_writer(out / "model.safetensors"), killed_writer(out / "teacher" / "zs-tiny-clip.json")]
    exported = invoke(zs_train, "export", trained["run"], "--out", out)
    assert exported.returncode == 0, exported.stderr
    assert not any(path.exists() for path in killed)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "README.md", "config.json", "model.safetensors", "teacher", "teacher/zs-tiny-clip.json"
    ]


def test_every_exported_file_follows_the_umask(trained, tmp_path):
    previous = os.umask(0o022)
    try:
        exported = invoke(zs_train, "export", trained["run"], "--out", tmp_path / "shared")
    finally:
        os.umask(previous)
    assert exported.returncode == 0, exported.stderr
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "shared").rglob("*")}
    assert modes == {"shared/README.md": 0o644, "shared/config.json": 0o644, "shared/model.safetensors": 0o644,
                     "shared/teacher": 0o755,
                     "shared/teacher/zs-tiny-clip.json": 0o644}


def test_a_disk_that_fills_during_an_export_is_one_line(trained, tmp_path):
    with tmpfs(tmp_path / "small", "size=64k") as small:
        exported = invoke(zs_train, "export", trained["run"], "--out", small / "exported")
        assert exported.returncode == 2 and "Traceback" not in exported.stderr
        assert exported.stderr.strip() == (
            f"error: exported weights {small / 'exported' / 'model.safetensors'} could not be written: "
            f"Error while serializing: I/O error: No space left on device (os error 28)"
        )
        assert not [path.name for path in (small / "exported").iterdir() if path.name.endswith(".partial")]


def test_every_export_has_a_model_card_and_timm_fields(trained):
    document = json.loads((trained["export"] / "config.json").read_text())
    card = (trained["export"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: zeroseg\n") and "ZeroSeg (Chen et al., ICCV 2023)" in card
    assert "**Teacher**: zs-tiny-clip (random weights)." in card and "**Steps**: 2 optimizer steps" in card
    assert 'Segmenter.from_pretrained("ORG/REPO")' in card and str(trained["root"]) not in card
    model_args, cfg = document["model_args"], document["pretrained_cfg"]
    assert (model_args["img_size"], model_args["patch_size"], model_args["class_token"]) == (32, 8, False)
    assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == document["preprocessing"]["mean"]
    timm.create_model(document["architecture"], pretrained=False, **model_args)  # timm builds it from the fields


@pytest.mark.parametrize("size", [(48, 64), (64, 96)])
def test_the_readme_timm_recipe_gives_the_encoders_features_at_other_sizes(trained, size):
    """The recipe of the README: the training grid's sin-cos table, resized by timm's resample_abs_pos_embed
    (bicubic, no antialias) to the input's grid; a sin-cos table of the new grid would differ."""
    from timm.layers import resample_abs_pos_embed

    from zeroseg.trainer.vit import sincos_pos_embed_2d

    student, _ = load_export(trained["export"])
    document = json.loads((trained["export"] / "config.json").read_text())
    vit = timm.create_model(document["architecture"], pretrained=False, **{**document["model_args"], "img_size": size})
    encoder = {k: v for k, v in student.state_dict().items() if k.split(".")[0] in ("patch_embed", "blocks", "norm")}
    vit.load_state_dict(encoder, strict=True)
    vit.eval()
    patch, dim = document["model_args"]["patch_size"], document["model_args"]["embed_dim"]
    trained_grid = [document["model_args"]["img_size"] // patch] * 2
    grid = [size[0] // patch, size[1] // patch]
    table = resample_abs_pos_embed(sincos_pos_embed_2d(dim, trained_grid)[None], new_size=grid,
                                   old_size=trained_grid, num_prefix_tokens=0, interpolation="bicubic", antialias=False)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = student.forward_encoder(images, mask_ratio=0.0)[0]  # (B, L, D)
        got = vit.norm(vit.blocks(vit.patch_embed(images) + table))
        sincos_of_the_new_grid = vit.norm(vit.blocks(vit.patch_embed(images) + sincos_pos_embed_2d(dim, grid)[None]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(sincos_of_the_new_grid, want, atol=1e-3)


def test_an_export_on_the_hub_loads_offline_from_the_cache(trained, tmp_path, monkeypatch):
    import huggingface_hub

    from tests.test_teacher import hub_cache_entry

    hub_cache_entry(tmp_path / "hub", "zs-test/tiny-zeroseg", trained["export"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # the cache only: no network
    kwargs = {"device": "cpu", "text_cache": tmp_path / "text", "geometry": GEOMETRY}
    from_hub = Segmenter.from_pretrained("zs-test/tiny-zeroseg", **kwargs)
    local = Segmenter.from_pretrained(trained["export"], **kwargs)
    assert "models--zs-test--tiny-zeroseg" in from_hub.loaded.description["checkpoint"]
    assert np.array_equal(from_hub(PHOTOS[0], classes=["cat", "dog"]).labels,
                          local(PHOTOS[0], classes=["cat", "dog"]).labels)  # fmt: skip
    segmented = invoke(zs_segment, PHOTOS[0], "--checkpoint", "hf-hub:zs-test/tiny-zeroseg", "--classes", "cat,dog",
                       "--out", tmp_path / "out", "--short-side", "64", "--device", "cpu", "--no-progress",
                       "--text-cache", tmp_path / "text")  # fmt: skip
    assert segmented.returncode == 0, segmented.stderr
    missing = invoke(zs_segment, PHOTOS[0], "--checkpoint", "hf-hub:zs-test/absent", "--classes", "cat",
                     "--out", tmp_path / "none")  # fmt: skip
    assert missing.returncode == 2 and missing.stderr.startswith("error: --checkpoint hf-hub:zs-test/absent: ")
    assert missing.stderr.count("\n") == 1


def test_push_to_hub_exports_first_and_says_in_one_line_why_it_cannot_upload_offline(trained, tmp_path):
    """Offline (HF_HUB_OFFLINE=1, as in every test) huggingface_hub refuses the upload before any network call:
    the test reaches the upload call boundary, not the Hub."""
    pushed = invoke(zs_train, "export", trained["run"], "--out", tmp_path / "out", "--push-to-hub", "zs-test/x")
    assert pushed.returncode == 2 and pushed.stderr.startswith("error: --push-to-hub zs-test/x: ")
    assert pushed.stderr.count("\n") == 1 and f"(the export is in {tmp_path / 'out'})" in pushed.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"model.safetensors", "config.json", "README.md"}
