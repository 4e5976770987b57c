"""COCO-Object label maps from a COCO instances JSON, for users without the COCO-Stuff maps.

One PNG per image in the JSON, named after the image file's stem (000000139.jpg -> 000000139.png),
palette mode holding class indices: 0 background, 1..80 the thing classes in category id order.
Every instance is painted, crowd regions (RLE) included, as COCO-Stuff's thing maps do. Where
instances overlap, larger ones (the JSON's `area`) are painted first so small objects on top of
them stay visible; equal areas go in annotation id order. Images without annotations are all
background. Existing outputs are kept (a rerun only fills the gaps); each file is written under a
temporary name and renamed, so an interrupted run leaves no partial PNG behind.
"""

import contextlib
import io
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from tqdm import tqdm

from zeroseg.errors import UserError, first_line
from zeroseg.evaluation.datasets import COCO_CATEGORY_TO_INDEX
from zeroseg.evaluation.drawing import label_image, save_png
from zeroseg.runtime import bar_disabled


def prepare_coco_object(instances_json: str | Path, out_dir: str | Path, progress: bool = True) -> int:
    """Write out_dir/<image stem>.png for every image of instances_json; returns how many were written."""
    coco = _load_instances(Path(instances_json))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for image_id in tqdm(sorted(coco.imgs), desc="COCO-Object label maps", disable=bar_disabled(progress)):
        info = coco.imgs[image_id]
        target = out_dir / f"{Path(info['file_name']).stem}.png"
        if target.exists():
            continue
        save_png(label_image(_label_map(coco, info, Path(instances_json))), target)
        written += 1
    return written


def _load_instances(path: Path) -> COCO:
    if not path.is_file():
        raise UserError(f"COCO instances file {path} not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = COCO(str(path))
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise UserError(f"{path} is not a COCO instances JSON: {first_line(exc)}") from None
    if not coco.imgs:
        raise UserError(f"{path} lists no images")
    unknown = sorted({ann["category_id"] for ann in coco.anns.values()} - COCO_CATEGORY_TO_INDEX.keys())
    if unknown:
        raise UserError(f"{path} uses category id {unknown[0]}, not one of the 80 COCO thing categories")
    return coco


def _label_map(coco: COCO, info: dict, path: Path) -> np.ndarray:
    labels = np.zeros((info["height"], info["width"]), dtype=np.uint8)  # [H, W]
    annotations = sorted(coco.imgToAnns[info["id"]], key=lambda ann: (-ann["area"], ann["id"]))
    for ann in annotations:
        polygons = ann["segmentation"] if isinstance(ann["segmentation"], list) else []
        # pycocotools refuses fewer than 4 numbers with a bare Exception and reads 4 as a box, not a polygon
        if any(not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2 for polygon in polygons):
            raise UserError(f"{path}: annotation {ann['id']} has a polygon that is not 3 or more x, y pairs")
        try:
            mask = coco.annToMask(ann).astype(bool)  # [H, W]; polygons, RLE and uncompressed (crowd) RLE
        except Exception as exc:  # pycocotools' own checks raise bare Exception
            raise UserError(f"{path}: annotation {ann['id']} cannot be drawn: {first_line(exc)}") from None
        labels[mask] = COCO_CATEGORY_TO_INDEX[ann["category_id"]]
    return labels
