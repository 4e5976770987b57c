"""zs-eval and zs-segment end to end: a tiny checkpoint trained by `zs-train run` on a store of the fixture
photos, the VOC fixture and COCO-Object maps prepared from the fixture instances JSON."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import (
    COCO_ROOT,
    SAMPLES,
    TINY_TEACHER,
    VOC_ROOT,
    eval_data_root,
    invoke,
    png_bomb_header,
    tiny_checkpoint,
)
from zeroseg.evaluation.cli import main as zs_eval
from zeroseg.evaluation.segment_cli import main as zs_segment

SMALL = ("--short-side", "64", "--crop-size", "64", "--stride", "32", "--no-progress")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tiny checkpoint, a data root with VOC and prepared COCO-Object, and the common zs-eval arguments."""
    root = tmp_path_factory.mktemp("eval")
    (checkpoint,) = (tiny_checkpoint(root) / "checkpoints").glob("step-*.pt")
    data = eval_data_root(root)
    common = ("--data-root", data, "--teacher", TINY_TEACHER, "--pretrained", "none", "--text-cache", root / "text")
    return {"root": root, "checkpoint": checkpoint, "data": data, "common": (*common, *SMALL)}


def results(folder: Path, dataset: str) -> dict:
    return json.loads((folder / f"{dataset}.json").read_text())


def test_ground_truth_as_predictions_scores_100(tmp_path):
    labels = VOC_ROOT / "SegmentationClass"
    out = invoke(zs_eval, "voc", "--data-root", SAMPLES, "--predictions", labels, "--out", tmp_path)
    assert out.returncode == 0, out.stderr
    document = results(tmp_path, "voc")
    assert document["mIoU"] == 100.0 and document["pixel_accuracy"] == 100.0 and document["mAcc"] == 100.0
    assert len(document["per_class_iou"]) == 21 and np.shape(document["confusion_matrix"]) == (21, 21)
    assert document["classes_in_mean"] == 3 and "bicycle" in document["absent_classes"]
    assert (tmp_path / "voc.md").read_text().startswith("# voc val: mIoU 100.00")


def test_zeroseg_checkpoint_on_voc_and_coco_and_its_saved_predictions_score_the_same(setup, tmp_path):
    out = invoke(
        zs_eval, "voc", "coco", "--checkpoint", setup["checkpoint"], *setup["common"], "--out", tmp_path / "res",
        "--save-predictions", tmp_path / "pred", "--save-vis", tmp_path / "vis",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "voc val (2 images): mIoU" in out.stdout and "coco val2017 (5 images): mIoU" in out.stdout
    voc, coco = results(tmp_path / "res", "voc"), results(tmp_path / "res", "coco")
    assert len(voc["per_class_iou"]) == 21 and len(coco["per_class_iou"]) == 81
    assert coco["num_pixels"] == sum(Image.open(p).width * Image.open(p).height for p in COCO_ROOT.glob("val2017/*"))
    assert voc["config"]["model"] == "zeroseg" and voc["config"]["labeling"]["bg_threshold"] == 0.95
    assert coco["config"]["labeling"]["bg_threshold"] == 0.35 and voc["config"]["teacher_matches_checkpoint"]
    assert voc["config"]["labeling"]["rule"] == "groupvit" and voc["config"]["labeling"]["top_k"] == 5
    assert voc["config"]["labeling"]["keep_best_group"] and voc["config"]["geometry"]["mode"] == "slide"
    assert sorted(p.stem for p in (tmp_path / "pred" / "coco").glob("*.png")) == sorted(
        p.stem for p in COCO_ROOT.glob("val2017/*.jpg")
    )
    visuals = sorted((tmp_path / "vis" / "voc").glob("*.png"))
    assert len(visuals) == 2
    image_width = Image.open(VOC_ROOT / "JPEGImages" / f"{visuals[0].stem}.jpg").width
    assert Image.open(visuals[0]).width > 2 * image_width  # ground truth | prediction | legend
    report = (tmp_path / "res" / "voc.md").read_text()
    assert f"- checkpoint: `{setup['checkpoint'].resolve()}`, step 2" in report
    assert "- background threshold: 0.95" in report and "- mode: slide (short_side 64" in report
    assert "- rule: groupvit (score top-k image prior softmax * softmax (GroupViT), top_k 5, logit_scale" in report
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(setup["root"] / "run" / "tensorboard"))
    events.Reload()
    settings = "short_side=64,crop_size=64,stride=32"  # SMALL: not the default protocol, so it names the tags
    (logged,) = events.Scalars(f"eval/coco/{settings}/mIoU")
    assert logged.step == 2 and logged.value == pytest.approx(coco["mIoU"])
    assert {f"eval/voc/{settings}/pixel_accuracy", f"eval/voc/{settings}/mAcc"} <= set(events.Tags()["scalars"])
    assert "eval/coco/mIoU" not in events.Tags()["scalars"]
    assert f"mAcc {voc['mAcc']:.2f}, pixel accuracy" in out.stdout
    assert "\n- zeroseg " in report and f", finished {voc['config']['finished']}" in report

    rescored = invoke(
        zs_eval, "voc", "coco", "--data-root", setup["data"], "--predictions", tmp_path / "pred",
        "--out", tmp_path / "rescored", "--no-progress",
    )  # fmt: skip
    assert rescored.returncode == 0, rescored.stderr
    assert "warning" not in rescored.stderr
    for dataset in ("voc", "coco"):
        again = results(tmp_path / "rescored", dataset)
        assert again["confusion_matrix"] == results(tmp_path / "res", dataset)["confusion_matrix"]

    record = json.loads((tmp_path / "pred" / "voc" / "zs-eval-run.json").read_text())
    assert record["dataset"] == "voc" and record["run"]["step"] == 2 and record["run"]["model"] == "zeroseg"
    older = sorted((tmp_path / "pred" / "voc").glob("*.png"))[0]
    os.utime(older, (record["started"] - 3600, record["started"] - 3600))  # a map left by an earlier run
    mixed = invoke(zs_eval, "voc", "--data-root", setup["data"], "--predictions", tmp_path / "pred",
                   "--out", tmp_path / "mixed", "--no-progress")
    assert mixed.returncode == 0, mixed.stderr
    assert f"warning: 1 of 2 predictions in {tmp_path / 'pred' / 'voc'} were not written by the run" in mixed.stderr
    assert older.name in mixed.stderr


def test_maskclip_baseline_and_slide_mode_run_through_the_same_evaluator(setup, tmp_path):
    maskclip = invoke(zs_eval, "voc", "coco", "--model", "maskclip", *setup["common"], "--out", tmp_path / "m")
    assert maskclip.returncode == 0, maskclip.stderr
    assert len(results(tmp_path / "m", "coco")["per_class_iou"]) == 81
    assert results(tmp_path / "m", "voc")["config"]["model"] == "maskclip"
    assert "Zhou et al., ECCV 2022" in results(tmp_path / "m", "voc")["config"]["method"]
    maskclip_config = results(tmp_path / "m", "voc")["config"]
    assert maskclip_config["labeling"]["rule"] == "softmax" and maskclip_config["labeling"]["keep_best_group"] is False
    assert maskclip_config["geometry"]["mode"] == "slide"  # zeroseg's geometry, its own per-patch rule
    assert "not the 'MaskCLIP' row" in (tmp_path / "m" / "voc.md").read_text()

    whole = invoke(
        zs_eval, "voc", "--checkpoint", setup["checkpoint"], *setup["common"], "--mode", "whole", "--rule", "softmax",
        "--keep-best-group", "--bg-threshold", "0.5", "--out", tmp_path / "s",
    )  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    config = results(tmp_path / "s", "voc")["config"]
    assert config["geometry"]["mode"] == "whole" and config["labeling"]["keep_best_group"] is True
    assert config["labeling"]["bg_threshold"] == 0.5 and config["labeling"]["rule"] == "softmax"
    assert config["labeling"]["top_k"] is None
    report = (tmp_path / "s" / "voc.md").read_text()
    assert "- rule: softmax (score softmax(cosine * min(exp(logit_scale), 100)), logit_scale" in report
    assert "top_k" not in report and "- mode: whole (" in report


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_processes_give_the_confusion_matrix_of_one(setup, tmp_path):
    arguments = ["coco", "--checkpoint", setup["checkpoint"], *setup["common"], "--device", "cpu"]
    single = invoke(zs_eval, *arguments, "--out", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "zeroseg.evaluation.cli", *map(str, arguments), "--out", str(tmp_path / "two"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = results(tmp_path / "one", "coco"), results(tmp_path / "two", "coco")
    assert two["config"]["world_size"] == 2 and one["config"]["world_size"] == 1
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert done.stdout.count("results:") == 1  # only rank 0 reports


def test_zs_segment_writes_label_map_overlay_and_segments_and_skips_broken_images(setup, tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    shutil.copy(VOC_ROOT / "JPEGImages" / "2007_000033.jpg", images / "plane.jpg")
    shutil.copy(COCO_ROOT / "val2017" / "000000128372.jpg", images / "sub" / "street.jpg")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    common = [a for a in setup["common"] if str(a) != "--data-root" and a != setup["data"]]
    out = invoke(
        zs_segment, images, "--checkpoint", setup["checkpoint"], "--classes", "aeroplane, sky, car, person",
        "--out", tmp_path / "out", *common,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.count("error:") == 2 and "broken.jpg" in out.stderr.splitlines()[0]
    assert "segmented 2 of 3 images" in out.stdout
    for name, size in (("plane", (500, 366)), ("sub/street", Image.open(images / "sub" / "street.jpg").size)):
        labels = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        assert labels.shape == size[::-1] and 1 <= labels.min() and labels.max() <= 4  # no background by default
        assert Image.open(tmp_path / "out" / f"{name}-overlay.png").width > size[0]  # image + legend
        record = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert abs(sum(s["pixel_share"] for s in record["segments"]) - 1) < 1e-9
        assert {s["class"] for s in record["segments"]} <= {"aeroplane", "sky", "car", "person"}
    settings = json.loads((tmp_path / "out" / "zs-segment.json").read_text())
    assert settings["class_names"] == ["background", "aeroplane", "sky", "car", "person"]

    imagenet = invoke(
        zs_segment, images / "plane.jpg", "--checkpoint", setup["checkpoint"], "--vocabulary", "imagenet1k",
        "--bg-threshold", "0.001", "--out", tmp_path / "imagenet", *common,
    )  # fmt: skip
    assert imagenet.returncode == 0, imagenet.stderr
    assert json.loads((tmp_path / "imagenet" / "plane.json").read_text())["segments"]


def test_user_errors_are_one_line_and_exit_2(setup, tmp_path):
    missing = invoke(zs_eval, "voc", "--data-root", tmp_path, "--predictions", tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert str(tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt") in missing.stderr
    unknown = invoke(zs_eval, "kitti", "--data-root", SAMPLES, "--predictions", tmp_path)
    assert unknown.returncode == 2 and "unknown dataset 'kitti'" in unknown.stderr
    no_checkpoint = invoke(zs_eval, "voc", "--checkpoint", tmp_path / "nope.pt", *setup["common"],
                           "--out", tmp_path / "results" / "never")  # fmt: skip
    assert no_checkpoint.returncode == 2 and "nope.pt" in no_checkpoint.stderr
    no_segments = invoke(zs_segment, VOC_ROOT / "JPEGImages", "--checkpoint", tmp_path / "nope.pt", "--classes", "cat",
                         "--out", tmp_path / "segments")  # fmt: skip
    assert no_segments.returncode == 2 and "nope.pt" in no_segments.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "segments").exists()  # failed: no empty folder
    no_coco_labels = invoke(zs_eval, "coco", "--data-root", SAMPLES, "--predictions", tmp_path)
    assert no_coco_labels.returncode == 2 and "coco_object" in no_coco_labels.stderr
    bad_vocabulary = invoke(zs_segment, tmp_path, "--checkpoint", setup["checkpoint"], "--vocabulary", "klingon")
    assert bad_vocabulary.returncode == 2 and "klingon" in bad_vocabulary.stderr
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 20)
    garbage = invoke(zs_eval, "voc", "--checkpoint", tmp_path / "garbage.pt", *setup["common"])
    assert garbage.returncode == 2 and garbage.stderr.count("\n") == 1
    assert garbage.stderr.startswith(f"error: checkpoint '{tmp_path / 'garbage.pt'}' cannot be read")
    bad_rule = invoke(zs_eval, "voc", "--checkpoint", setup["checkpoint"], *setup["common"], "--rule", "mmseg")
    assert bad_rule.returncode == 2 and "--rule 'mmseg' is not one of groupvit, softmax" in bad_rule.stderr


def test_images_of_more_than_max_pixels_are_one_line_each(setup, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(VOC_ROOT / "JPEGImages" / "2007_000033.jpg", images / "plane.jpg")
    bomb = images / "bomb.png"
    bomb.write_bytes(png_bomb_header(10_000, 10_000))
    common = [a for a in setup["common"] if str(a) != "--data-root" and a != setup["data"]]
    out = invoke(zs_segment, images, "--checkpoint", setup["checkpoint"], "--classes", "aeroplane, sky",
                 "--out", tmp_path / "out", *common)
    assert out.returncode == 1 and "segmented 1 of 2 images" in out.stdout
    assert out.stderr.splitlines() == [
        f"error: {bomb}: image too large: 10000x10000 = 100000000 pixels, more than --max-pixels 64000000",
        "error: 1 image(s) could not be read",
    ]
    data = tmp_path / "data"
    shutil.copytree(VOC_ROOT.parent, data / "VOCdevkit")
    first = data / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000033.jpg"  # of the val split
    first.write_bytes(png_bomb_header(10_000, 10_000))
    common = [data if a == setup["data"] else a for a in setup["common"]]
    refused = invoke(zs_eval, "voc", "--checkpoint", setup["checkpoint"], *common, "--out", tmp_path / "res")
    assert refused.returncode == 2 and not (tmp_path / "res" / "voc.json").exists()
    assert refused.stderr.strip() == (
        f"error: cannot read image {first}: image too large: 10000x10000 = 100000000 pixels, more than --max-pixels "
        f"64000000"
    )
    assert "are reported in one line and skipped" in " ".join(invoke(zs_segment, "--help").stdout.split())
    assert "stop the evaluation with an error naming the image" in " ".join(invoke(zs_eval, "--help").stdout.split())


KILLED_AT_REPORT = """
import os, signal, sys
from zeroseg.evaluation.cli import main

synced = os.fsync
def fsync_then_die_at_the_report(handle):  # SIGKILL once the new voc.json is written, before its rename
    synced(handle)
    if os.path.basename(os.readlink(f"/proc/self/fd/{handle}")).startswith(".voc.json."):
        os.kill(os.getpid(), signal.SIGKILL)
os.fsync = fsync_then_die_at_the_report
sys.argv[0] = "zs-eval"
main()
"""


def test_a_kill_while_the_report_is_written_leaves_the_previous_report_whole(tmp_path):
    labels = VOC_ROOT / "SegmentationClass"
    args = ["voc", "--data-root", SAMPLES, "--predictions", labels, "--out", tmp_path, "--no-progress"]
    assert invoke(zs_eval, *args).returncode == 0
    before = (tmp_path / "voc.json").read_text()
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_REPORT, *map(str, args)], capture_output=True)
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "voc.json").read_text() == before and json.loads(before)["mIoU"] == 100.0
    assert len(list(tmp_path.glob(".voc.json.*.partial"))) == 1
    assert invoke(zs_eval, *args).returncode == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["voc.json", "voc.md"]
