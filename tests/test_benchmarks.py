"""The eight benchmarks in mmsegmentation's layouts, on generated samples (random pixels, random label maps in
each benchmark's stored values): ground truth as predictions scores 100, perturbed predictions give the
confusion matrix counted here pixel by pixel, `zs-eval prepare` converts official maps to train ids, and a
tiny ZeroSeg checkpoint and the four training-free methods run on the five benchmarks without background."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_TEACHER, invoke, tiny_checkpoint
from zeroseg.errors import UserError
from zeroseg.evaluation.cli import main as zs_eval
from zeroseg.evaluation.datasets import DATASETS, open_dataset
from zeroseg.evaluation.methods import METHODS

NEW = ("voc20", "context59", "coco-stuff", "cityscapes", "ade20k")
EIGHT = ("voc", "voc20", "context", "context59", "coco", "coco-stuff", "cityscapes", "ade20k")
# Where each benchmark's files lie under the data root (voc20 and context59 share voc's and context's files).
LAYOUT = {
    "voc": ("VOCdevkit/VOC2012/JPEGImages/{id}.jpg", "VOCdevkit/VOC2012/SegmentationClass/{id}.png"),
    "context": ("VOCdevkit/VOC2010/JPEGImages/{id}.jpg", "VOCdevkit/VOC2010/SegmentationClassContext/{id}.png"),
    "coco": ("coco/val2017/{id}.jpg", "coco/coco_object/val2017/{id}.png"),
    "coco-stuff": (
        "coco_stuff164k/images/val2017/{id}.jpg", "coco_stuff164k/annotations/val2017/{id}_labelTrainIds.png"
    ),
    "cityscapes": (
        "cityscapes/leftImg8bit/val/{city}/{id}_leftImg8bit.png",
        "cityscapes/gtFine/val/{city}/{id}_gtFine_labelTrainIds.png",
    ),
    "ade20k": (
        "ADEChallengeData2016/images/validation/{id}.jpg", "ADEChallengeData2016/annotations/validation/{id}.png"
    ),
}  # fmt: skip
SPLIT_LISTS = {"voc": "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt",
               "context": "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt"}  # fmt: skip
# The values a benchmark's stored label maps hold, and the stored value of class 0.
STORED = {
    "voc": [*range(21), 255], "context": [*range(60), 255], "coco": list(range(81)),
    "coco-stuff": [*range(171), 255], "cityscapes": [*range(19), 255], "ade20k": list(range(151)),
}  # fmt: skip
FILES_OF = {"voc20": "voc", "context59": "context"}
OFFSET = {"voc20": 1, "context59": 1, "ade20k": 1}  # stored value of class 0 (value 0 ignored)
IDS = {"cityscapes": [("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000001_000019")]}
SIZES = ((24, 32), (30, 20))  # (height, width) of the two images of each benchmark
SMALL = ("--short-side", "32", "--no-progress", "--templates", "single")


def image_ids(files: str) -> list[tuple[str, str]]:
    """(city, image id) of the two images of a layout (city: Cityscapes only)."""
    return IDS.get(files, [("", f"2008_00000{i}" if files in SPLIT_LISTS else f"00000000013{i}") for i in (1, 2)])


def generate(root: Path, seed: int = 0) -> Path:
    """Two images with random label maps per benchmark, in its layout under root."""
    rng = np.random.default_rng(seed)
    for files, (image_pattern, label_pattern) in LAYOUT.items():
        ids = image_ids(files)
        for (city, image_id), (height, width) in zip(ids, SIZES, strict=True):
            image_path = root / image_pattern.format(id=image_id, city=city)
            label_path = root / label_pattern.format(id=image_id, city=city)
            for path in (image_path, label_path):
                path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image_path)
            stored = rng.choice(np.array(STORED[files], dtype=np.uint8), (height, width))
            label = Image.fromarray(stored)
            if files in SPLIT_LISTS:  # PASCAL's maps are palette PNGs
                label = label.convert("P")
                label.putpalette(list(range(256)) * 3)
            label.save(label_path)
        if files in SPLIT_LISTS:
            (root / SPLIT_LISTS[files]).parent.mkdir(parents=True, exist_ok=True)
            (root / SPLIT_LISTS[files]).write_text("".join(f"{image_id}\n" for _, image_id in ids))
    return root


def truth_of(dataset: str, root: Path) -> dict[str, np.ndarray]:
    """{image id: class indices [H, W]} read straight off the stored maps: value v is class v - offset,
    values below the offset and 255 are the ignore label 255."""
    files = FILES_OF.get(dataset, dataset)
    offset = OFFSET.get(dataset, 0)
    truth = {}
    for city, image_id in image_ids(files):
        stored = np.asarray(Image.open(root / LAYOUT[files][1].format(id=image_id, city=city))).astype(np.int64)
        truth[image_id] = np.where((stored == 255) | (stored < offset), 255, stored - offset)
    return truth


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("benchmarks"))


def write_predictions(folder: Path, predictions: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True)
    for image_id, labels in predictions.items():
        Image.fromarray(labels.astype(np.uint8)).save(folder / f"{image_id}.png")


def report(folder: Path, dataset: str) -> dict:
    return json.loads((folder / f"{dataset}.json").read_text())


def test_the_registry_carries_background_and_label_offsets_of_the_eight():
    assert tuple(DATASETS) == EIGHT
    counts = {name: len(spec.class_names) for name, spec in DATASETS.items()}
    assert counts == {"voc": 21, "voc20": 20, "context": 60, "context59": 59, "coco": 81, "coco-stuff": 171,
                      "cityscapes": 19, "ade20k": 150}  # fmt: skip
    assert [name for name, spec in DATASETS.items() if spec.has_background] == ["voc", "context", "coco"]
    assert {name: spec.label_offset for name, spec in DATASETS.items() if spec.label_offset} == OFFSET
    assert DATASETS["coco-stuff"].class_names[79:82] == ("toothbrush", "banner", "blanket")
    assert DATASETS["cityscapes"].class_names[6] == "traffic light" and DATASETS["ade20k"].class_names[-1] == "flag"


def test_ground_truth_as_predictions_scores_100_on_every_benchmark(data, tmp_path):
    for dataset in EIGHT:
        truth = truth_of(dataset, data)
        write_predictions(tmp_path / "pred" / dataset, {i: np.where(t == 255, 0, t) for i, t in truth.items()})
    out = invoke(zs_eval, *EIGHT, "--data-root", data, "--predictions", tmp_path / "pred", "--out", tmp_path / "res")
    assert out.returncode == 0, out.stderr
    for dataset in EIGHT:
        document = report(tmp_path / "res", dataset)
        assert document["mIoU"] == 100.0 and document["num_images"] == 2, dataset
        assert len(document["per_class_iou"]) == len(DATASETS[dataset].class_names)
        kept = sum(int((t != 255).sum()) for t in truth_of(dataset, data).values())
        assert document["num_pixels"] == kept > 0

    table = invoke(zs_eval, "compare", *(tmp_path / "res" / f"{d}.json" for d in EIGHT), "--out", tmp_path / "t")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split() == ["method", *EIGHT] and row.split() == ["predictions", "pred", *["100.00"] * 8]


def test_perturbed_predictions_give_the_confusion_matrix_counted_by_hand(data, tmp_path):
    for dataset in NEW:
        classes = len(DATASETS[dataset].class_names)
        truth = truth_of(dataset, data)
        predicted = {}
        reference = [[0] * classes for _ in range(classes)]
        for image_id, labels in truth.items():
            guess = np.zeros_like(labels)
            for (row, col), value in np.ndenumerate(labels):
                wrong = (row + col) % 3 == 0  # every third pixel takes the next class
                guess[row, col] = 7 if value == 255 else (value + 1) % classes if wrong else value
                if value != 255:
                    reference[value][int(guess[row, col])] += 1
            predicted[image_id] = guess
        write_predictions(tmp_path / "pred" / dataset, predicted)
        out = invoke(zs_eval, dataset, "--data-root", data, "--predictions", tmp_path / "pred", "--out", tmp_path)
        assert out.returncode == 0, out.stderr
        assert report(tmp_path, dataset)["confusion_matrix"] == reference, dataset


def test_stored_values_outside_a_benchmark_are_one_line_errors(tmp_path):
    root = generate(tmp_path / "data")
    path = root / LAYOUT["ade20k"][1].format(id="000000000131", city="")
    stored = np.asarray(Image.open(path)).copy()
    stored[0, 0] = 151
    Image.fromarray(stored).save(path)
    with pytest.raises(UserError) as error:
        open_dataset("ade20k", root).load_label(0)
    expected = "holds value 151: ade20k stores classes as 1..150 and ignores 255 and values below 1"
    assert str(error.value) == f"label map {path} {expected}"
    (root / LAYOUT["cityscapes"][1].format(id=IDS["cityscapes"][0][1], city="frankfurt")).unlink()
    missing = invoke(zs_eval, "cityscapes", "--data-root", root, "--predictions", tmp_path)
    assert missing.returncode == 2 and "`zs-eval prepare cityscapes` makes them" in missing.stderr
    assert len(open_dataset("coco-stuff", root)) == 2


def test_prepare_cityscapes_and_coco_stuff_write_the_train_ids_of_their_official_maps(tmp_path):
    # Cityscapes label ids (cityscapesscripts' labels.py) and their train ids; the ids not evaluated -> 255.
    label_ids = np.array([[0, 7, 8, 11, 12, 13, 17], [19, 20, 21, 22, 23, 24, 25], [26, 27, 28, 31, 32, 33, 6]])
    train_ids = np.array([[255, 0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 255]])
    gt = tmp_path / "cityscapes" / "gtFine" / "val" / "ulm"
    gt.mkdir(parents=True)
    Image.fromarray(label_ids.astype(np.uint8)).save(gt / "ulm_000000_000019_gtFine_labelIds.png")
    # stuffthingmaps: person (id 1), unused id 12, stop sign (id 13), toothbrush (90), banner (92), wood (182),
    # unlabelled -> 0, 255, 11, 79, 80, 170, 255
    stuff = tmp_path / "coco_stuff164k" / "annotations" / "val2017"
    stuff.mkdir(parents=True)
    Image.fromarray(np.array([[0, 11, 12, 89, 91, 181, 255]], dtype=np.uint8)).save(stuff / "000000000139.png")

    for benchmark in ("cityscapes", "coco-stuff"):
        done = invoke(zs_eval, "prepare", benchmark, "--data-root", tmp_path, "--no-progress")
        assert done.returncode == 0, done.stderr
        assert f"wrote 1 {benchmark} train-id label maps" in done.stdout
    converted = np.asarray(Image.open(gt / "ulm_000000_000019_gtFine_labelTrainIds.png"))
    assert converted.tolist() == train_ids.tolist()
    assert np.asarray(Image.open(stuff / "000000000139_labelTrainIds.png")).tolist() == [[0, 255, 11, 79, 80, 170, 255]]
    again = invoke(zs_eval, "prepare", "coco-stuff", "--data-root", tmp_path, "--no-progress")
    assert again.returncode == 0 and "wrote 0 coco-stuff" in again.stdout

    Image.fromarray(np.array([[0, 200]], dtype=np.uint8)).save(stuff / "000000000285.png")
    damaged = invoke(zs_eval, "prepare", "coco-stuff", "--data-root", tmp_path, "--no-progress")
    assert damaged.returncode == 2 and damaged.stderr.count("\n") == 1
    assert f"{stuff / '000000000285.png'} holds value 200" in damaged.stderr
    nothing = invoke(zs_eval, "prepare", "cityscapes", "--data-root", tmp_path / "elsewhere")
    assert nothing.returncode == 2 and "cityscapes/gtFine/val not found" in nothing.stderr


def test_each_method_has_its_papers_settings_on_the_new_benchmarks():
    sclip, clearclip, naclip = (METHODS[name] for name in ("sclip", "clearclip", "naclip"))
    assert [sclip.on(d).short_side for d in NEW] == [336, 336, 448, 560, 336]
    assert [naclip.on(d).short_side for d in NEW] == [336, 336, 336, 560, 336]
    assert [naclip.on(d).mode for d in NEW] == ["whole", "slide", "slide", "slide", "slide"]
    assert [clearclip.on(d).crop_size for d in NEW] == [448, 448, 448, 224, 448]
    assert {sclip.on(d).temperature for d in NEW} == {naclip.on(d).temperature for d in NEW} == {40.0}
    assert {clearclip.on(d).temperature for d in NEW} == {50.0}
    shared = ["sclip_context59", "sclip_coco_stuff", "sclip_cityscapes", "sclip_ade20k"]  # the three papers' own
    assert [sclip.on(d).names for d in NEW] == [naclip.on(d).names for d in NEW] == ["sclip_voc20", *shared]
    assert [clearclip.on(d).names for d in NEW] == ["clearclip_voc20", *shared]


@pytest.mark.slow
def test_a_checkpoint_and_the_training_free_methods_run_on_the_benchmarks_without_background(data, tmp_path):
    (checkpoint,) = (tiny_checkpoint(tmp_path) / "checkpoints").glob("step-*.pt")
    common = ("--data-root", data, "--teacher", TINY_TEACHER, "--pretrained", "none", "--text-cache", tmp_path / "text")
    runs = {"zeroseg": ("--checkpoint", checkpoint, "--crop-size", "32", "--stride", "16")}
    runs |= {method: ("--model", method) for method in ("maskclip", "sclip", "clearclip", "naclip")}
    for method, arguments in runs.items():
        saving = ("--save-predictions", tmp_path / "pred") if method == "clearclip" else ()
        out = invoke(zs_eval, *NEW, *arguments, *common, *SMALL, "--out", tmp_path / method, *saving)
        assert out.returncode == 0, f"{method}: {out.stderr}"
        for dataset in NEW:
            document = report(tmp_path / method, dataset)
            classes = len(DATASETS[dataset].class_names)
            assert len(document["per_class_iou"]) == classes and document["num_images"] == 2
            kept = sum(int((t != 255).sum()) for t in truth_of(dataset, data).values())
            assert np.asarray(document["confusion_matrix"]).sum() == document["num_pixels"] == kept
            labeling = document["config"]["labeling"]
            assert labeling["background_class"] is False and labeling["bg_threshold"] is None
            assert labeling["background_names"] == []  # clearclip's 'background' too: these have none
            assert labeling["names_file"] == METHODS[method].on(dataset).names  # maskclip: None, the benchmark's
    sclip_voc20 = report(tmp_path / "sclip", "voc20")["config"]["labeling"]
    assert sclip_voc20["names_file"] == "sclip_voc20" and sclip_voc20["queries"] == 30  # person 7 names, tv 5
    assert report(tmp_path / "clearclip", "voc20")["config"]["labeling"]["queries"] == 20
    assert report(tmp_path / "clearclip", "cityscapes")["config"]["geometry"]["crop_size"] == 224
    assert report(tmp_path / "naclip", "voc20")["config"]["geometry"]["mode"] == "whole"
    for dataset in NEW:
        saved = [np.asarray(Image.open(path)) for path in (tmp_path / "pred" / dataset).glob("*.png")]
        assert len(saved) == 2 and max(int(s.max()) for s in saved) < len(DATASETS[dataset].class_names)
    rescored = invoke(zs_eval, *NEW, "--data-root", data, "--predictions", tmp_path / "pred", "--out", tmp_path / "r")
    assert rescored.returncode == 0, rescored.stderr
    for dataset in NEW:
        again = report(tmp_path / "r", dataset)["confusion_matrix"]
        assert again == report(tmp_path / "clearclip", dataset)["confusion_matrix"]
