import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from tests.conftest import COCO_INSTANCES as COCO_JSON
from tests.conftest import SAMPLES, invoke
from tests.conftest import VOC_ROOT as VOC
from zeroseg.errors import UserError
from zeroseg.evaluation.cli import main as zs_eval
from zeroseg.evaluation.coco_prepare import prepare_coco_object
from zeroseg.evaluation.datasets import Sample, coco_stuff_lookup, open_dataset

# The sample scenes' COCO category ids and their COCO-Object class index, read off the official category list.
COCO_INDEX = {1: 1, 3: 3, 4: 4, 6: 6, 23: 22, 31: 27, 41: 37, 44: 40}
# pycocotools' mask decoding predates numpy 2's copy keyword; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def test_voc_val_split_loads_with_the_documented_counts():
    dataset = open_dataset("voc", SAMPLES)
    assert (dataset.num_classes, dataset.ignore_index, dataset.bg_threshold) == (21, 255, 0.95)
    assert dataset.class_names[11] == "table" and dataset.class_names[20] == "monitor"
    assert [sample.image_id for sample in dataset.samples] == ["2007_000033", "2007_000123"]
    for index in range(len(dataset)):
        image_id, image, labels = dataset[index]
        assert image.mode == "RGB" and labels.shape == (image.height, image.width)
        assert set(np.unique(labels)) <= set(range(21)) | {255}
        if image_id == "2007_000033":
            values, counts = np.unique(labels, return_counts=True)
            counted = dict(zip(values.tolist(), counts.tolist(), strict=True))
            assert counted == {0: 500 * 366 - 36000 - 4300, 1: 300 * 120, 255: 310 * 130 - 300 * 120}


def test_voc_train_split_has_two_classes_in_2007_000032():  # boxes of 240 x 80 and 40 x 100
    dataset = open_dataset("voc", SAMPLES, split="train")
    labels = dataset.load_label([s.image_id for s in dataset.samples].index("2007_000032"))
    assert (labels == 1).sum() == 19200 and (labels == 15).sum() == 4000


def test_missing_dataset_is_a_one_line_user_error_naming_the_expected_path(tmp_path):
    with pytest.raises(UserError) as error:
        open_dataset("voc", tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt") in message
    with pytest.raises(UserError, match="coco/val2017"):
        open_dataset("coco", tmp_path)
    with pytest.raises(UserError, match="unknown dataset 'ade'"):
        open_dataset("ade", tmp_path)


def test_listed_image_without_files_and_malformed_lists_are_user_errors(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(VOC, root)
    (root / "SegmentationClass" / "2007_000123.png").unlink()
    with pytest.raises(UserError, match="SegmentationClass/2007_000123.png not found"):
        open_dataset("voc", tmp_path)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("JPEGImages/a.jpg SegmentationClass/a.png\n")
    with pytest.raises(UserError, match="one image id per line"):
        open_dataset("voc", tmp_path)


def test_colour_label_maps_are_rejected(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(VOC, root)
    Image.open(root / "SegmentationClass" / "2007_000033.png").convert("RGB").save(
        root / "SegmentationClass" / "2007_000033.png"
    )
    with pytest.raises(UserError, match="is a RGB image"):
        open_dataset("voc", tmp_path)[0]


def test_context_layout_of_the_mmsegmentation_converter(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    for folder in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (base / folder).mkdir(parents=True)
    shutil.copy(VOC / "JPEGImages" / "2007_000033.jpg", base / "JPEGImages" / "2008_000001.jpg")
    labels = (np.arange(366 * 500) % 60).reshape(366, 500).astype(np.uint8)
    Image.fromarray(labels).save(base / "SegmentationClassContext" / "2008_000001.png")
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000001\n")
    dataset = open_dataset("context", tmp_path)
    assert (dataset.num_classes, dataset.bg_threshold, len(dataset)) == (60, 0.05, 1)
    image_id, _, loaded = dataset[0]
    assert image_id == "2008_000001" and np.array_equal(loaded, labels)


def _inside_polygon(x: float, y: float, polygon: list[float]) -> bool:
    xs, ys = polygon[0::2], polygon[1::2]
    inside = False
    for i in range(len(xs)):
        j = i - 1
        if (ys[i] > y) != (ys[j] > y) and x < (xs[j] - xs[i]) * (y - ys[i]) / (ys[j] - ys[i]) + xs[i]:
            inside = not inside
    return inside


def _inside_box(x: float, y: float, box: list[float]) -> bool:
    return box[0] <= x <= box[0] + box[2] and box[1] <= y <= box[1] + box[3]


@pytest.fixture(scope="module")
def coco_maps(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("coco_object")
    assert prepare_coco_object(COCO_JSON, out_dir, progress=False) == 6
    return out_dir


def test_coco_maps_cover_every_image_at_its_size(coco_maps):
    instances = json.loads(COCO_JSON.read_text())
    for info in instances["images"]:
        labels = np.asarray(Image.open(coco_maps / f"{Path(info['file_name']).stem}.png"))
        split = "train2017" if info["id"] == 89 else "val2017"
        with Image.open(SAMPLES / "coco" / split / info["file_name"]) as image:
            assert labels.shape == (image.height, image.width)
        assert labels.max() <= 80
        if info["id"] == 89:
            assert not labels.any()


def test_coco_polygon_centres_and_empty_corners_hold_the_hand_checked_labels(coco_maps):
    instances = json.loads(COCO_JSON.read_text())
    checked = 0
    for ann in instances["annotations"]:
        if ann["iscrowd"]:
            continue
        polygon = ann["segmentation"][0]
        x, y = float(np.mean(polygon[0::2])), float(np.mean(polygon[1::2]))
        others = [o for o in instances["annotations"] if o["image_id"] == ann["image_id"] and o is not ann]
        if not _inside_polygon(x, y, polygon) or any(_inside_box(x, y, o["bbox"]) for o in others):
            continue
        labels = np.asarray(Image.open(coco_maps / f"{ann['image_id']:012d}.png"))
        assert labels[round(y), round(x)] == COCO_INDEX[ann["category_id"]], ann["id"]
        checked += 1
    assert checked >= 15
    bus_scene = np.asarray(Image.open(coco_maps / "000000128372.png"))
    assert bus_scene[245, 380] == COCO_INDEX[3]  # a small car in front of the bus stays visible
    assert bus_scene[150, 200] == COCO_INDEX[6]
    for info in instances["images"]:
        boxes = [a["bbox"] for a in instances["annotations"] if a["image_id"] == info["id"]]
        assert not any(_inside_box(2, 2, box) for box in boxes)
        assert np.asarray(Image.open(coco_maps / f"{info['id']:012d}.png"))[2, 2] == 0


def test_coco_crowd_rle_region_is_painted_as_its_class(coco_maps):
    crowd = next(a for a in json.loads(COCO_JSON.read_text())["annotations"] if a["iscrowd"])
    height, width = crowd["segmentation"]["size"]
    region = mask_utils.decode(mask_utils.frPyObjects(crowd["segmentation"], height, width)).astype(bool)
    labels = np.asarray(Image.open(coco_maps / f"{crowd['image_id']:012d}.png"))
    assert region.sum() > 500
    assert (labels[region] == COCO_INDEX[44]).all()


def test_prepare_keeps_existing_outputs(coco_maps):
    before = {path.name: path.stat().st_mtime_ns for path in coco_maps.iterdir()}
    assert prepare_coco_object(COCO_JSON, coco_maps, progress=False) == 0
    assert {path.name: path.stat().st_mtime_ns for path in coco_maps.iterdir()} == before


def test_prepare_rejects_a_file_that_is_not_instances_json(tmp_path):
    not_json = tmp_path / "broken.json"
    not_json.write_text("{ not json")
    with pytest.raises(UserError, match="broken.json is not a COCO instances JSON"):
        prepare_coco_object(not_json, tmp_path / "out", progress=False)


def _coco_root(tmp_path: Path) -> Path:
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "val2017").symlink_to(SAMPLES / "coco" / "val2017")
    return tmp_path


def test_coco_dataset_reads_prepared_maps(tmp_path, coco_maps):
    root = _coco_root(tmp_path)
    shutil.copytree(coco_maps, root / "coco" / "coco_object" / "val2017")
    dataset = open_dataset("coco", root)
    assert (dataset.num_classes, dataset.bg_threshold, len(dataset)) == (81, 0.35, 5)
    image_id, image, labels = dataset[0]
    assert image_id == "000000128372" and labels.shape == (image.height, image.width)
    assert np.array_equal(labels, np.asarray(Image.open(coco_maps / "000000128372.png")))


def test_coco_stuff_maps_become_things_and_background(tmp_path):
    root = _coco_root(tmp_path)
    stuff_dir = root / "coco" / "stuffthingmaps_trainval2017" / "val2017"
    stuff_dir.mkdir(parents=True)
    for path in sorted((root / "coco" / "val2017").glob("*.jpg")):
        with Image.open(path) as image:
            stuff = np.full((image.height, image.width), 255, dtype=np.uint8)
        # values: person (id 1), unused thing id 12, toothbrush (id 90), first stuff class, unlabelled
        stuff[0, :5] = [0, 11, 89, 91, 255]
        Image.fromarray(stuff).save(stuff_dir / f"{path.stem}.png")
    labels = open_dataset("coco", root).load_label(0)
    assert labels[0, :5].tolist() == [1, 0, 80, 0, 0]
    assert not labels[1:].any()
    assert (coco_stuff_lookup() > 0).sum() == 80


def test_a_benchmark_added_as_one_spec_is_evaluated_by_zs_eval(monkeypatch, tmp_path):
    """Adding a benchmark is one DatasetSpec: zs-eval opens it, takes its split, threshold and class names."""
    from tests.conftest import invoke
    from zeroseg.evaluation.cli import main as zs_eval
    from zeroseg.evaluation.datasets import DATASETS, VOC_CLASS_NAMES, DatasetSpec

    def find_samples(root: Path, split: str):
        base = root / "VOCdevkit" / "VOC2012"
        ids = (base / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        return [Sample(i, base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png") for i in ids], None

    spec = DatasetSpec("mini", "val", 0.5, VOC_CLASS_NAMES, find_samples, "  mini     the VOC fixture again.\n")
    monkeypatch.setitem(DATASETS, "mini", spec)
    labels = VOC / "SegmentationClass"
    out = invoke(zs_eval, "mini", "--data-root", SAMPLES, "--predictions", labels, "--out", tmp_path, "--no-progress")
    assert out.returncode == 0, out.stderr
    document = json.loads((tmp_path / "mini.json").read_text())
    assert document["mIoU"] == 100.0 and len(document["per_class_iou"]) == 21
    assert (tmp_path / "mini.md").read_text().startswith("# mini val: mIoU 100.00")


def test_every_benchmark_is_in_the_data_layout_help():
    from zeroseg.evaluation.datasets import DATA_LAYOUT, DATASETS

    assert DATA_LAYOUT.startswith("Data layout under --data-root (DATA_ROOT):\n\n")
    named = [line.split()[0] for line in DATA_LAYOUT.splitlines() if line.startswith("  ") and line[2] != " "]
    assert named == list(DATASETS)


@pytest.mark.parametrize("polygon", [[10.0, 20.0, 30.0], [10.0, 20.0, 30.0, 40.0], [1, 2, 3, 4, 5, 6, 7]])
def test_prepare_refuses_a_polygon_that_is_not_pairs_of_three_points_or_more_in_one_line(tmp_path, polygon):
    """pycocotools raises a bare 'input type is not supported' for 3 numbers and reads 4 as a box."""
    instances = json.loads(COCO_JSON.read_text())
    ann = next(a for a in instances["annotations"] if isinstance(a["segmentation"], list))
    ann["segmentation"] = [polygon]
    hostile = tmp_path / "instances.json"
    hostile.write_text(json.dumps(instances))
    prepared = invoke(zs_eval, "prepare", "coco", "--instances", hostile, "--out", tmp_path / "out", "--no-progress")
    assert prepared.returncode == 2 and prepared.stderr == (
        f"error: {hostile}: annotation {ann['id']} has a polygon that is not 3 or more x, y pairs\n"
    )
