"""zs-eval --model sclip / clearclip / naclip end to end on the VOC and COCO-Object fixtures with the tiny random
CLIP, each method's own settings recorded in its report, and `zs-eval compare` over the reports."""

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_TEACHER, eval_data_root, invoke
from zeroseg.evaluation.cli import main as zs_eval
from zeroseg.evaluation.loading import read_names_file
from zeroseg.evaluation.methods import METHODS as TABLE

METHODS = ("sclip", "clearclip", "naclip")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A data root (VOC fixture, COCO-Object prepared from the fixture instances) and zs-eval runs of each
    method on voc (the method's own prompts) and coco (one prompt, to keep the text encoding short); the
    method's own geometry is kept small by --short-side only."""
    root = tmp_path_factory.mktemp("baselines")
    data = eval_data_root(root)
    common = (
        "--data-root", data, "--teacher", TINY_TEACHER, "--pretrained", "none", "--text-cache", root / "text",
        "--no-progress", "--short-side", "96",
    )  # fmt: skip
    outputs = {}
    for method in METHODS:
        outputs[method] = root / method
        voc = invoke(zs_eval, "voc", "--model", method, *common, "--out", outputs[method])
        assert voc.returncode == 0, voc.stderr
        coco = invoke(zs_eval, "coco", "--model", method, *common, "--templates", "single", "--out", outputs[method])
        assert coco.returncode == 0, coco.stderr
        assert "voc val (2 images): mIoU" in voc.stdout and "coco val2017 (5 images): mIoU" in coco.stdout
    return {"root": root, "data": data, "common": common, "outputs": outputs}


def report(folder, dataset: str) -> dict:
    return json.loads((folder / f"{dataset}.json").read_text())


def test_each_method_runs_through_the_evaluator_with_its_papers_settings(runs):
    sclip, clearclip, naclip = (runs["outputs"][m] for m in METHODS)
    for method, folder in runs["outputs"].items():
        for dataset, classes in (("voc", 21), ("coco", 81)):
            document = report(folder, dataset)
            assert document["config"]["model"] == method and len(document["per_class_iou"]) == classes
            assert np.asarray(document["confusion_matrix"]).sum() == document["num_pixels"] > 0
            assert len(document["config"]["templates"]) == (80 if dataset == "voc" else 1)  # voc: openai80
            assert document["config"]["geometry"]["short_side"] == 96  # given; the rest is the method's
            labeling = document["config"]["labeling"]
            assert labeling["rule"] == "softmax" and labeling["keep_best_group"] is False  # each pixel alone
    voc, coco = report(sclip, "voc")["config"], report(sclip, "coco")["config"]
    assert voc["labeling"]["temperature"] == pytest.approx(65.0) and coco["labeling"]["temperature"] == pytest.approx(
        50
    )
    assert voc["labeling"]["bg_threshold"] == 0.1
    assert voc["labeling"]["background_names"] == read_names_file("sclip_voc", 21)[0]
    assert voc["labeling"]["names_file"] == "sclip_voc" and coco["labeling"]["names_file"] == "sclip_coco"
    assert voc["labeling"]["area_threshold"] == 0.1 and coco["labeling"]["area_threshold"] is None
    assert voc["geometry"] | {"short_side": 336} == {
        "mode": "slide", "short_side": 336, "max_long_side": 2048, "crop_size": 224, "stride": 112,
    }  # fmt: skip
    clear_voc, clear_coco = report(clearclip, "voc")["config"], report(clearclip, "coco")["config"]
    assert clear_voc["labeling"]["bg_threshold"] == 0.5 and clear_coco["labeling"]["bg_threshold"] == 0.4
    assert clear_voc["labeling"]["background_names"] == ["background"]
    assert clear_voc["labeling"]["temperature"] == pytest.approx(50.0) and clear_voc["geometry"]["crop_size"] == 448
    na_voc, na_coco = report(naclip, "voc")["config"], report(naclip, "coco")["config"]
    assert na_voc["geometry"]["mode"] == "whole" and na_coco["geometry"]["mode"] == "slide"
    assert na_voc["last_block"].startswith("Attn(softmax(k k^T * scale + gaussian_prior))")
    assert na_voc["gaussian_std"] == 5.0 and na_voc["labeling"]["temperature"] == pytest.approx(40.0)


def test_every_setting_is_an_option(runs, tmp_path):
    done = invoke(
        zs_eval, "voc", "--model", "naclip", *runs["common"], "--out", tmp_path, "--gaussian-std", "2",
        "--temperature", "20", "--bg-threshold", "0.3", "--background-names", "none", "--templates", "single",
        "--mode", "slide", "--crop-size", "64", "--stride", "32",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = report(tmp_path, "voc")["config"]
    assert config["gaussian_std"] == 2.0 and config["labeling"]["temperature"] == pytest.approx(20.0)
    assert config["labeling"]["bg_threshold"] == 0.3 and config["labeling"]["background_names"] == []
    assert config["templates"] == ["a photo of a {}."] and config["geometry"]["crop_size"] == 64

    wrong = invoke(zs_eval, "voc", "--model", "sclip", *runs["common"], "--gaussian-std", "2")
    assert wrong.returncode == 2 and "--gaussian-std is NACLIP's" in wrong.stderr
    too_hot = invoke(zs_eval, "voc", "--model", "clearclip", *runs["common"], "--temperature", "500")
    assert too_hot.returncode == 2 and "--temperature must be in (0, 100]" in too_hot.stderr


def test_compare_prints_one_table_of_methods_by_datasets_and_writes_markdown_and_png(runs, tmp_path):
    outputs = runs["outputs"]
    reports = [outputs["sclip"] / "voc.json", outputs["clearclip"] / "coco.json", outputs["naclip"] / "voc.json"]
    reports.append(outputs["naclip"] / "coco.json")
    done = invoke(zs_eval, "compare", *reports, "--out", tmp_path / "table")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()[:4]
    assert header.split() == ["method", "voc", "coco"]
    name = f"{TINY_TEACHER.stem} none"
    miou = {m: {d: report(outputs[m], d)["mIoU"] for d in ("voc", "coco")} for m in METHODS}
    assert rows[0].split() == ["sclip", *name.split(), f"{miou['sclip']['voc']:.2f}", "-"]
    assert rows[1].split() == ["clearclip", *name.split(), "-", f"{miou['clearclip']['coco']:.2f}"]
    assert rows[2].split() == ["naclip", *name.split(), f"{miou['naclip']['voc']:.2f}", f"{miou['naclip']['coco']:.2f}"]
    markdown = (tmp_path / "table" / "compare.md").read_text().splitlines()
    assert markdown[2:4] == ["| method | voc | coco |", "|---|---:|---:|"]
    assert markdown[4] == f"| sclip {name} | {miou['sclip']['voc']:.2f} | - |"
    with Image.open(tmp_path / "table" / "compare.png") as picture:
        assert picture.format == "PNG" and picture.width > 100

    (tmp_path / "file").write_text("")
    on_a_file = invoke(zs_eval, "compare", *reports, "--out", tmp_path / "file")
    assert on_a_file.returncode == 2 and "is a file, not a folder" in on_a_file.stderr
    twice = invoke(zs_eval, "compare", reports[0], reports[0])
    assert twice.returncode == 2 and f"two reports of sclip {name} on voc" in twice.stderr
    (tmp_path / "other.json").write_text('{"hello": 1}')
    foreign = invoke(zs_eval, "compare", tmp_path / "other.json")
    assert foreign.returncode == 2 and str(tmp_path / "other.json") in foreign.stderr
    assert foreign.stderr.count("\n") == 1


def test_the_help_lists_every_method_of_the_table_with_its_settings():
    shown = invoke(zs_eval, "--help")
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    for name, method in TABLE.items():
        block = method.last_block.formula if method.last_block else "the ZeroSeg student of --checkpoint"
        assert f" {name} {block} {method.describe()}" in text, name
    assert (
        "sclip x + Attn(softmax(q q^T * scale) + softmax(k k^T * scale)), then + mlp(ln_2(.)) rule softmax; "
        "temperature 65 (voc), 50 (context, coco), else 40; threshold 0.1; templates openai80; short side 448 "
        "(coco-stuff), 560 (cityscapes), else 336 (long side at most 2048); mode slide (crop 224, stride 112); names "
        "sclip_voc (voc), sclip_voc20 (voc20), sclip_coco (coco), sclip_context (context), sclip_context59 "
        "(context59), sclip_coco_stuff (coco-stuff), sclip_cityscapes (cityscapes), sclip_ade20k (ade20k), else none "
        "(line 0: the background class where the benchmark has one); "
        "area threshold 0.1 (voc), else none"
    ) in text
    assert "threshold 0.5 (voc), 0.15 (context), 0.4 (coco), else 0; templates openai80;" in text
    assert "mode whole (voc, voc20), else slide (crop 224, stride 112); Gaussian std 5 patches" in text
    assert "PAMR 10 steps" in text and "GroupViT's configs' 0.95 voc, 0.35 context, 0.95 coco" in text
    assert "the paper's (0.95 voc, 0.05 context, 0.35 coco;" in text
