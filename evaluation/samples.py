"""Sample data of our own: generated scenes with known label maps, written in the real layouts and formats of
the PASCAL VOC 2012 and COCO 2017 benchmarks, so the demo and the tests need no third-party images.

`write_samples(root)` writes root/ as zs-eval's --data-root reads it (see datasets.DATA_LAYOUT):

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg            the photos
    VOCdevkit/VOC2012/SegmentationClass/<id>.png     palette PNGs: class indices, 255 "void" borders
    VOCdevkit/VOC2012/SegmentationObject/<id>.png    palette PNGs: instance indices 1.., the same borders
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    coco/{val2017,train2017}/<12-digit id>.jpg       the photos
    coco/annotations/instances_samples2017.json     COCO instances: polygons, one RLE crowd, 80 categories

VOC objects are boxes with a 5-pixel void border outside them, so every label count is a product of sides
(2007_000033: 300 x 120 = 36000 aeroplane pixels, 310 x 130 - 36000 = 4300 void, the rest background).
COCO objects are polygons (float vertices, shoelace areas, bounding boxes as COCO writes them) and one crowd
region stored as uncompressed column-major RLE, as in COCO's own instances files. The photos paint each object
in its class colour with stripes and seeded noise over a sky-to-ground gradient; the same call writes the same
bytes. The COCO-Object label maps come from `zs-eval prepare coco --instances .../instances_samples2017.json`.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from zeroseg.evaluation.datasets import COCO_THING_CATEGORIES
from zeroseg.evaluation.drawing import label_image, palette

VOID = 255
VOID_WIDTH = 5  # pixels of void border around every VOC object


@dataclass(frozen=True)
class Box:
    """A VOC object: class index and its box, right and bottom exclusive."""

    label: int
    left: int
    top: int
    right: int
    bottom: int


@dataclass(frozen=True)
class VocScene:
    image_id: str
    size: tuple[int, int]  # (width, height)
    split: str
    objects: tuple[Box, ...]


@dataclass(frozen=True)
class CocoScene:
    image_id: int
    size: tuple[int, int]  # (width, height)
    split: str  # val2017 or train2017
    polygons: tuple[tuple[int, tuple[float, ...]], ...]  # (category id, x0, y0, x1, y1, ...)
    crowd: tuple[int, tuple[float, float, float, float]] | None = None  # (category id, ellipse cx, cy, rx, ry)


VOC_SCENES = (
    VocScene("2007_000032", (500, 281), "train", (Box(1, 60, 40, 300, 120), Box(15, 380, 150, 420, 250))),
    VocScene("2007_000033", (500, 366), "val", (Box(1, 100, 100, 400, 220),)),
    VocScene("2007_000063", (500, 375), "train", (Box(9, 50, 150, 200, 350), Box(12, 260, 200, 460, 330))),
    VocScene("2007_000123", (500, 375), "val", (Box(19, 40, 120, 460, 260),)),
)

COCO_SCENES = (
    CocoScene(128372, (640, 427), "val2017", (
        (6, (100.0, 100.0, 540.0, 90.0, 560.0, 330.0, 90.0, 340.0)),  # a bus
        (3, (340.0, 220.0, 420.0, 220.0, 420.0, 270.0, 340.0, 270.0)),  # a small car in front of it
        (1, (575.0, 150.0, 600.0, 150.0, 605.0, 260.0, 570.0, 260.0)),
        (1, (600.0, 300.0, 630.0, 300.0, 630.0, 410.0, 610.0, 410.0)),
        (1, (20.0, 360.0, 60.0, 360.0, 55.0, 420.0, 25.0, 420.0)),
        (31, (120.0, 370.0, 160.0, 370.0, 150.0, 400.0)),
    )),
    CocoScene(404249, (427, 640), "val2017", (
        (1, (150.0, 80.0, 260.0, 80.0, 280.0, 470.0, 140.0, 470.0)),
        (41, (100.0, 520.0, 320.0, 520.0, 300.0, 560.0, 120.0, 560.0)),
    )),
    CocoScene(343934, (640, 480), "val2017", ((4, (120.0, 140.0, 500.0, 120.0, 540.0, 400.0, 90.0, 380.0)),)),
    CocoScene(194216, (640, 294), "val2017", (
        (23, (40.0, 100.0, 200.0, 90.0, 190.0, 250.0, 60.0, 240.0)),
        (23, (250.0, 150.0, 380.0, 140.0, 360.0, 260.0)),
        (23, (430.0, 60.0, 600.0, 80.0, 590.0, 220.0, 440.0, 200.0)),
    )),
    CocoScene(464689, (586, 640), "val2017", (
        (44, (300.0, 50.0, 330.0, 50.0, 330.0, 150.0, 300.0, 150.0)),
        (44, (360.0, 60.0, 385.0, 60.0, 385.0, 140.0, 360.0, 140.0)),
        (44, (420.0, 200.0, 450.0, 200.0, 450.0, 320.0, 420.0, 320.0)),
        (44, (480.0, 400.0, 510.0, 400.0, 505.0, 500.0, 485.0, 500.0)),
        (44, (300.0, 500.0, 340.0, 500.0, 335.0, 600.0, 305.0, 600.0)),
    ), crowd=(44, (150.0, 450.0, 60.0, 40.0))),
    CocoScene(89, (640, 480), "train2017", ()),  # no annotations: all background
)  # fmt: skip

COCO_INSTANCES = "instances_samples2017.json"


def write_samples(root: str | Path) -> Path:
    """Write the VOC and COCO sample scenes under root (see the module docstring); returns root."""
    root = Path(root)
    for scene in VOC_SCENES:
        _write_voc_scene(root / "VOCdevkit" / "VOC2012", scene)
    lists = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    for split, keep in (("train", {"train"}), ("val", {"val"}), ("trainval", {"train", "val"})):
        lists.joinpath(f"{split}.txt").write_text("".join(f"{s.image_id}\n" for s in VOC_SCENES if s.split in keep))
    images, annotations = [], []
    for scene in COCO_SCENES:
        image, scene_annotations = _write_coco_scene(root / "coco", scene, first_id=len(annotations) + 1)
        images.append(image)
        annotations += scene_annotations
    instances = {
        "info": {"description": "zeroseg generated sample scenes", "version": "1.0", "year": 2017},
        "licenses": [{"id": 1, "name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"}],
        "categories": [{"id": category, "name": name} for category, name in COCO_THING_CATEGORIES],
        "images": images,
        "annotations": annotations,
    }
    (root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "coco" / "annotations" / COCO_INSTANCES).write_text(json.dumps(instances))
    return root


def sample_photos(root: str | Path) -> list[Path]:
    """The 10 photos of write_samples(root) (written here when root holds none): the VOC ones, then COCO's."""
    root = Path(root)
    if not (root / "VOCdevkit").is_dir():
        write_samples(root)
    return sorted(root.glob("VOCdevkit/VOC2012/JPEGImages/*.jpg")) + sorted(root.glob("coco/*/*.jpg"))


def _write_voc_scene(base: Path, scene: VocScene) -> None:
    width, height = scene.size
    classes = np.zeros((height, width), dtype=np.uint8)  # [H, W]
    instances = np.zeros((height, width), dtype=np.uint8)  # [H, W]
    photo = _background(scene.size, seed=len(scene.objects) + width * height)
    for instance, box in enumerate(scene.objects, 1):
        outer = np.s_[box.top - VOID_WIDTH : box.bottom + VOID_WIDTH, box.left - VOID_WIDTH : box.right + VOID_WIDTH]
        inner = np.s_[box.top : box.bottom, box.left : box.right]
        classes[outer], instances[outer] = VOID, VOID
        classes[inner], instances[inner] = box.label, instance
    for box in scene.objects:
        mask = np.zeros((height, width), dtype=bool)
        mask[box.top : box.bottom, box.left : box.right] = True
        _paint(photo, mask, box.label, seed=box.left * 1000 + box.top)
    for folder, content in (("SegmentationClass", classes), ("SegmentationObject", instances)):
        (base / folder).mkdir(parents=True, exist_ok=True)
        label_image(content).save(base / folder / f"{scene.image_id}.png")
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo).save(base / "JPEGImages" / f"{scene.image_id}.jpg", quality=90)


def _write_coco_scene(coco: Path, scene: CocoScene, first_id: int) -> tuple[dict, list[dict]]:
    width, height = scene.size
    file_name = f"{scene.image_id:012d}.jpg"
    photo = _background(scene.size, seed=scene.image_id)
    annotations = []
    for category, polygon in scene.polygons:
        outline = Image.new("1", scene.size)
        ImageDraw.Draw(outline).polygon(polygon, fill=1)
        _paint(photo, np.asarray(outline), category, seed=len(annotations) + scene.image_id)
        xs, ys = polygon[0::2], polygon[1::2]
        area = 0.5 * abs(sum(xs[i - 1] * ys[i] - xs[i] * ys[i - 1] for i in range(len(xs))))  # shoelace
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        annotations.append({"segmentation": [list(polygon)], "area": area, "iscrowd": 0, "bbox": bbox,
                            "category_id": category})  # fmt: skip
    if scene.crowd is not None:
        category, (cx, cy, rx, ry) = scene.crowd
        rows, cols = np.mgrid[0:height, 0:width]
        region = ((cols - cx) / rx) ** 2 + ((rows - cy) / ry) ** 2 <= 1  # [H, W]
        _paint(photo, region, category, seed=scene.image_id + 7)
        top, left = np.argwhere(region).min(axis=0)
        bottom, right = np.argwhere(region).max(axis=0) + 1
        annotations.append({
            "segmentation": {"counts": _column_major_runs(region), "size": [height, width]},
            "area": int(region.sum()), "iscrowd": 1,
            "bbox": [int(left), int(top), int(right - left), int(bottom - top)], "category_id": category,
        })  # fmt: skip
    for number, annotation in enumerate(annotations):
        annotation.update(image_id=scene.image_id, id=first_id + number)
    (coco / scene.split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo).save(coco / scene.split / file_name, quality=90)
    image = {"id": scene.image_id, "file_name": file_name, "width": width, "height": height, "license": 1,
             "coco_url": f"{scene.split}/{file_name}", "date_captured": "2017-01-01 00:00:00"}  # fmt: skip
    return image, annotations


def _column_major_runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: alternating run lengths of 0s and 1s down the columns, starting with 0s."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] if flat[0] else []) + runs


def _background(size: tuple[int, int], seed: int) -> np.ndarray:
    """[H, W, 3] uint8: a sky-to-ground gradient with blotches and grain."""
    width, height = size
    t = np.linspace(0, 1, height)[:, None, None]  # [H, 1, 1]
    sky, ground = np.array([150, 190, 235]), np.array([110, 100, 80])
    gradient = (1 - t) * sky + t * ground  # [H, 1, 3]
    return np.clip(gradient + _texture(size, seed, 40), 0, 255).astype(np.uint8)


def _paint(photo: np.ndarray, mask: np.ndarray, label: int, seed: int) -> None:
    """Paint the mask's pixels of photo [H, W, 3] in the label's palette colour, with stripes, blotches and grain."""
    height, width = mask.shape
    colour = palette(256)[label % 256].astype(np.float64) * 0.6 + 50
    stripes = 20 * np.sin(np.arange(width) / (3 + label % 5))[None, :, None]  # [1, W, 1]
    painted = np.clip(colour + stripes + _texture((width, height), seed, 30), 0, 255).astype(np.uint8)
    photo[mask] = painted[mask]


def _texture(size: tuple[int, int], seed: int, strength: float) -> np.ndarray:
    """[H, W, 3] float: seeded colour blotches (a coarse random grid, bicubically enlarged) plus fine grain."""
    width, height = size
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, strength, (12, 16, 3)).astype(np.float32)
    blotches = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize(size, Image.BICUBIC)) for c in range(3)], -1)
    return blotches + rng.normal(0, 6, (height, width, 3))
