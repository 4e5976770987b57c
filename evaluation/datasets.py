"""The benchmarks, one `DatasetSpec` each in DATASETS, their class names and their readers.

A spec holds everything the tools know of a benchmark: its name on the command line, default split,
whether it has a background class (and the paper's threshold for it), class names, how stored label values
map to class indices, its part of the data layout (`zs-eval --help`) and how its (image id, image file, label
file) triples are found. Adding a benchmark is one spec here and its class names; a method's row in
evaluation.methods may give its paper settings for it (a PerDataset).

Class names are both legend labels and CLIP text. A benchmark with a background class (voc, context, coco)
has 'background' at index 0: only the names from index 1 go through the text tower, and background is what a
segment becomes when no class scores above the threshold. A benchmark without one (voc20, context59,
coco-stuff, cityscapes, ade20k: mmsegmentation's protocol of the training-free methods) sends every name
through the text tower and every pixel takes a class; its ground truth's background, if any, is ignored.
The text names of voc and context are those GroupViT feeds its text encoder, so scores stay comparable with
it: VOC's diningtable / pottedplant / tvmonitor are 'table' / 'plant' / 'monitor', and PASCAL Context says
'airplane', 'plant', 'monitor'; voc20 and context59 are their lists without background. COCO keeps the
official category names; COCO-Stuff, Cityscapes and ADE20K mmsegmentation's.

Stored label values v become class v - label_offset (mmsegmentation's reduce_zero_label is offset 1: value 0
is then ignored); 255 is ignored everywhere; any other value is an error naming the file.

Labels are returned as [H, W] uint8 arrays of class indices, images as RGB PIL images of the same size.
EXIF orientation is not applied: the benchmarks' label maps are drawn on the stored pixels.
"""

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from zeroseg.errors import UserError, first_line
from zeroseg.pipeline.images import read_header
from zeroseg.pipeline.options import DEFAULT_MAX_PIXELS

IGNORE_INDEX = 255
_LABEL_MODES = ("P", "L", "I;16", "I")

VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "table", "dog", "horse", "motorbike", "person", "plant", "sheep", "sofa", "train", "monitor",
)  # fmt: skip

# PASCAL Context 59 classes in the label order of mmsegmentation's VOC2010 converter, plus background.
CONTEXT_CLASS_NAMES = (
    "background", "airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "plant", "road",
    "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree",
    "truck", "monitor", "wall", "water", "window", "wood",
)  # fmt: skip

# The 80 COCO thing categories as (category id in the instances JSON, name); ids run 1..90 with gaps.
COCO_THING_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"),
    (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"),
    (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"),
    (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"),
    (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"),
    (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"),
    (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"),
    (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"),
    (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"),
    (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip

# COCO category id -> COCO-Object class index (1..80, in category id order; 0 is background).
COCO_CATEGORY_TO_INDEX = {category: index for index, (category, _) in enumerate(COCO_THING_CATEGORIES, 1)}

COCO_OBJECT_CLASS_NAMES = ("background",) + tuple(name for _, name in COCO_THING_CATEGORIES)

# COCO-Stuff-164k's 91 stuff classes (category ids 92..182), in id order; its 171 classes are the 80 things, then these.
COCO_STUFF_NAMES = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower",
    "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow",
    "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete",
    "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
)  # fmt: skip
COCO_STUFF_CLASS_NAMES = COCO_OBJECT_CLASS_NAMES[1:] + COCO_STUFF_NAMES

# Cityscapes' 19 evaluated classes in train-id order.
CITYSCAPES_CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# ADE20K (SceneParsing, ADEChallengeData2016) 150 classes, label values 1..150 in order: mmsegmentation's
# ADE20KDataset classes (its 'bed ' without the stray trailing space).
ADE20K_CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip


@dataclass(frozen=True)
class Sample:
    image_id: str
    image_path: Path
    label_path: Path


SampleFinder = Callable[[Path, str], tuple[list[Sample], np.ndarray | None]]  # (data root, split) -> samples, lookup


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark, as the tools know it."""

    name: str  # on the command line and in reports
    default_split: str
    bg_threshold: float | None  # the ZeroSeg paper's background threshold; None: no background class
    class_names: tuple[str, ...]  # index 0 is 'background' exactly when the benchmark has one
    find_samples: SampleFinder  # may return a [256] uint8 table: stored label value -> class index
    layout: str  # its part of DATA_LAYOUT
    label_offset: int = 0  # stored value v is class v - label_offset; values below it are ignored

    def __post_init__(self) -> None:
        if self.has_background != (self.class_names[:1] == ("background",)):
            raise ValueError(f"{self.name}: 'background' is class 0 exactly when there is a background threshold")

    @property
    def has_background(self) -> bool:
        return self.bg_threshold is not None


@dataclass
class SegmentationDataset:
    """Indexing gives (image id, RGB PIL image, [H, W] uint8 labels)."""

    name: str
    samples: list[Sample]
    class_names: tuple[str, ...]
    bg_threshold: float | None  # None: no background class (every pixel takes a class)
    ignore_index: int = IGNORE_INDEX
    label_lookup: np.ndarray | None = None  # [256] uint8: stored label value -> class index
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger images or label maps are an error, told from the header
    label_offset: int = 0  # stored value v is class v - label_offset; values below it are ignored

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_background(self) -> bool:
        return self.bg_threshold is not None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[str, Image.Image, np.ndarray]:
        sample = self.samples[index]
        image = self.load_image(index)
        labels = self.load_label(index)
        if labels.shape != (image.height, image.width):
            raise UserError(
                f"label map {sample.label_path} is {labels.shape[1]}x{labels.shape[0]} "
                f"but its image is {image.width}x{image.height}"
            )
        return sample.image_id, image, labels

    def load_image(self, index: int) -> Image.Image:
        path = self.samples[index].image_path
        try:
            data = path.read_bytes()
            read_header(data, self.max_pixels)
            with Image.open(io.BytesIO(data)) as opened:
                return opened.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            raise UserError(f"cannot read image {path}: {first_line(exc)}") from None

    def load_label(self, index: int) -> np.ndarray:
        path = self.samples[index].label_path
        labels = read_label_png(path, self.max_pixels)
        if self.label_lookup is not None:
            if labels.dtype != np.uint8:
                raise UserError(f"label map {path} is not 8-bit; COCO-Stuff maps hold values 0..255")
            return self.label_lookup[labels]
        ignored = labels == self.ignore_index
        classes = labels.astype(np.int64) - self.label_offset  # [H, W]
        invalid = ~ignored & (classes >= self.num_classes)
        if invalid.any():
            first, last = self.label_offset, self.label_offset + self.num_classes - 1
            raise UserError(
                f"label map {path} holds value {int(labels[invalid][0])}: "
                f"{self.name} stores classes as {first}..{last} and ignores {self.ignore_index}"
                + (f" and values below {first}" if first else "")
            )
        return np.where(ignored | (classes < 0), self.ignore_index, classes).astype(np.uint8)


def read_label_png(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A PNG of class indices (palette or greyscale, 8 or 16 bit, at most max_pixels pixels) -> [H, W] integer
    array."""
    try:
        data = path.read_bytes()
        read_header(data, max_pixels)
        with Image.open(io.BytesIO(data)) as opened:
            if opened.mode not in _LABEL_MODES:
                raise UserError(f"{path} is a {opened.mode} image, not palette or greyscale class indices")
            return np.asarray(opened)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read label map {path}: {first_line(exc)}") from None


def lookup_table(mapping: dict[int, int], otherwise: int) -> np.ndarray:
    """[256] int16 table of stored 8-bit label values: mapping's values, `otherwise` for the other values."""
    table = np.full(256, otherwise, dtype=np.int16)
    table[list(mapping)] = list(mapping.values())
    return table


def coco_stuff_lookup() -> np.ndarray:
    """[256] uint8 table: COCO-Stuff-164k stuffthingmaps value -> COCO-Object class index."""
    return lookup_table({category - 1: index for category, index in COCO_CATEGORY_TO_INDEX.items()}, 0).astype(np.uint8)


def open_dataset(
    name: str, data_root: str | Path, split: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> SegmentationDataset:
    """The split (default: the spec's) of dataset `name` under data_root, whose images and label maps may have at
    most max_pixels pixels; UserError if incomplete."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}' (choose from {', '.join(DATASET_NAMES)})")
    spec = DATASETS[name]
    samples, lookup = spec.find_samples(Path(data_root), split or spec.default_split)
    _require_files(samples)
    return SegmentationDataset(
        name, samples, spec.class_names, spec.bg_threshold, label_lookup=lookup, max_pixels=max_pixels,
        label_offset=spec.label_offset,
    )


def prepared_coco_dir(data_root: str | Path, split: str = "val2017") -> Path:
    """Where COCO-Object label maps made by `prepare_coco_object` are looked for first."""
    return Path(data_root) / "coco" / "coco_object" / split


def _read_id_list(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"split list {path} not found (the expected layout: zs-eval --help, Data layout)")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    malformed = next((line for line in ids if len(line.split()) != 1), None)
    if malformed is not None:
        raise UserError(f"split list {path} has line '{malformed}'; expected one image id per line")
    if not ids:
        raise UserError(f"split list {path} is empty")
    return ids


def _pascal_samples(year: str, split_folder: str, label_folder: str) -> SampleFinder:
    """The finder of a PASCAL-layout benchmark under DATA_ROOT/VOCdevkit/VOC<year>/."""

    def find(root: Path, split: str) -> tuple[list[Sample], None]:
        base = root / "VOCdevkit" / f"VOC{year}"
        ids = _read_id_list(base / "ImageSets" / split_folder / f"{split}.txt")
        jpegs, labels = base / "JPEGImages", base / label_folder
        return [Sample(i, jpegs / f"{i}.jpg", labels / f"{i}.png") for i in ids], None

    return find


def _coco_object_samples(root: Path, split: str) -> tuple[list[Sample], np.ndarray | None]:
    image_dir = root / "coco" / split
    if not image_dir.is_dir():
        raise UserError(f"COCO image folder {image_dir} not found (expected DATA_ROOT/coco/{split}/*.jpg)")
    ids = sorted(path.stem for path in image_dir.glob("*.jpg"))
    if not ids:
        raise UserError(f"COCO image folder {image_dir} holds no .jpg images")
    prepared = prepared_coco_dir(root, split)
    stuff = root / "coco" / "stuffthingmaps_trainval2017" / split
    if prepared.is_dir():
        label_dir, lookup = prepared, None
    elif stuff.is_dir():
        label_dir, lookup = stuff, coco_stuff_lookup()
    else:
        raise UserError(f"COCO-Object label maps not found: expected {prepared} or {stuff}")
    return [Sample(i, image_dir / f"{i}.jpg", label_dir / f"{i}.png") for i in ids], lookup


def _folder_samples(
    dataset_dir: str, image_dir: str, label_dir: str, image_suffix: str, label_suffix: str, nested: bool = False,
    prepare: str = "",
) -> SampleFinder:
    """The finder of a benchmark whose split is every DATA_ROOT/<dataset_dir>/<image_dir>/<split>/[<folder>/]
    <id><image_suffix> (nested: one folder deep) with its label map <label_dir>/<split>/[<folder>/]<id><label_suffix>;
    `prepare` names the zs-eval prepare command that makes missing label maps."""

    def find(root: Path, split: str) -> tuple[list[Sample], None]:
        images, labels = root / dataset_dir / image_dir / split, root / dataset_dir / label_dir / split
        if not images.is_dir():
            raise UserError(f"image folder {images} not found (the expected layout: zs-eval --help, Data layout)")
        paths = sorted(images.glob(("*/*" if nested else "*") + image_suffix))
        if not paths:
            raise UserError(f"image folder {images} holds no *{image_suffix} images")
        samples = []
        for path in paths:
            image_id = path.name[: -len(image_suffix)]
            label = labels / path.parent.relative_to(images) / f"{image_id}{label_suffix}"
            if prepare and not label.is_file():
                raise UserError(f"label map {label} not found; `zs-eval prepare {prepare}` makes them")
            samples.append(Sample(image_id, path, label))
        return samples, None

    return find


def _require_files(samples: list[Sample]) -> None:
    for sample in samples:
        for path in (sample.image_path, sample.label_path):
            if not path.is_file():
                raise UserError(f"dataset file {path} not found (listed image id '{sample.image_id}')")


# Background thresholds are the ZeroSeg paper's (section 4.2): 0.95 VOC, 0.05 Context, 0.35 COCO;
# None: no background class.
# GroupViT's configs (segmentation/configs/_base_/datasets/*.py, test_cfg bg_thresh) use other ones, one
# option away: zs-eval --thresholds groupvit.
GROUPVIT_THRESHOLDS = {"voc": 0.95, "context": 0.35, "coco": 0.95}
THRESHOLD_SETS = ("paper", "groupvit")
DATASETS = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "voc", "val", 0.95, VOC_CLASS_NAMES, _pascal_samples("2012", "Segmentation", "SegmentationClass"),
            """\
  voc      DATA_ROOT/VOCdevkit/VOC2012/  JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette PNGs,
           0 background, 1..20, 255 ignored), ImageSets/Segmentation/<split>.txt (one id a line).
""",
        ),
        DatasetSpec(
            "voc20", "val", None, VOC_CLASS_NAMES[1:], _pascal_samples("2012", "Segmentation", "SegmentationClass"),
            """\
  voc20    as voc, without the background class: 0 ignored, 1..20 the classes 0..19.
""",
            label_offset=1,
        ),
        DatasetSpec(
            "context", "val", 0.05, CONTEXT_CLASS_NAMES,
            _pascal_samples("2010", "SegmentationContext", "SegmentationClassContext"),
            """\
  context  DATA_ROOT/VOCdevkit/VOC2010/  as mmsegmentation's PASCAL Context converter writes it:
           JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png (0 background, 1..59, 255 ignored),
           ImageSets/SegmentationContext/<split>.txt.
""",
        ),
        DatasetSpec(
            "context59", "val", None, CONTEXT_CLASS_NAMES[1:],
            _pascal_samples("2010", "SegmentationContext", "SegmentationClassContext"),
            """\
  context59  as context, without the background class: 0 ignored, 1..59 the classes 0..58.
""",
            label_offset=1,
        ),
        DatasetSpec(
            "coco", "val2017", 0.35, COCO_OBJECT_CLASS_NAMES, _coco_object_samples,
            """\
  coco     DATA_ROOT/coco/  <split>/<id>.jpg (COCO's val2017 folder) and label maps, the first of
             coco_object/<split>/<id>.png   written by `zs-eval prepare coco` (0 background, 1..80), or
             stuffthingmaps_trainval2017/<split>/<id>.png   COCO-Stuff-164k maps, converted on reading:
               value v <= 90 is COCO category v + 1 -> its class index 1..80; every other value
               (the 11 unused thing ids, stuff 91..181, unlabelled 255) -> background 0.
           The split's ids are the .jpg stems in the image folder; each needs a label map.
           `zs-eval prepare coco --instances instances_val2017.json --data-root DATA_ROOT` makes the former.
""",
        ),
        DatasetSpec(
            "coco-stuff", "val2017", None, COCO_STUFF_CLASS_NAMES,
            _folder_samples("coco_stuff164k", "images", "annotations", ".jpg", "_labelTrainIds.png",
                            prepare="coco-stuff"),
            """\
  coco-stuff  DATA_ROOT/coco_stuff164k/  as mmsegmentation's coco_stuff164k converter writes it:
           images/<split>/<id>.jpg, annotations/<split>/<id>_labelTrainIds.png (0..170: the 80 things, then
           the 91 stuff classes; 255 ignored). The split's ids are the .jpg stems. `zs-eval prepare coco-stuff`
           makes them from the stuffthingmaps annotations/<split>/<id>.png.
""",
        ),
        DatasetSpec(
            "cityscapes", "val", None, CITYSCAPES_CLASS_NAMES,
            _folder_samples("cityscapes", "leftImg8bit", "gtFine", "_leftImg8bit.png", "_gtFine_labelTrainIds.png",
                            nested=True, prepare="cityscapes"),
            """\
  cityscapes  DATA_ROOT/cityscapes/  leftImg8bit/<split>/<city>/<name>_leftImg8bit.png,
           gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png (train ids 0..18, 255 ignored); image id
           <name>. `zs-eval prepare cityscapes` makes them from gtFine's <name>_gtFine_labelIds.png.
""",
        ),
        DatasetSpec(
            "ade20k", "validation", None, ADE20K_CLASS_NAMES,
            _folder_samples("ADEChallengeData2016", "images", "annotations", ".jpg", ".png"),
            """\
  ade20k   DATA_ROOT/ADEChallengeData2016/  images/<split>/<id>.jpg, annotations/<split>/<id>.png (0 ignored,
           1..150 the classes); the split's ids are the .jpg stems.
""",
            label_offset=1,
        ),
    )
}
DATASET_NAMES = tuple(DATASETS)
DATA_LAYOUT = "Data layout under --data-root (DATA_ROOT):\n\n" + "".join(spec.layout for spec in DATASETS.values())
