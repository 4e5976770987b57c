"""Train-id label maps from the official downloads, as mmsegmentation's converters write them, for users who have
not run those: `zs-eval prepare cityscapes` (gtFine label ids -> labelTrainIds) and `zs-eval prepare coco-stuff`
(stuffthingmaps -> labelTrainIds).

Each source PNG's 8-bit values go through a table into a palette PNG beside it, named with the target suffix.
A value the table does not know is an error naming the file (a map of another kind, or damaged). Existing
outputs are kept (a rerun only fills the gaps); each file is written under a temporary name and renamed.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zeroseg.errors import UserError
from zeroseg.evaluation.datasets import COCO_CATEGORY_TO_INDEX, IGNORE_INDEX, lookup_table, read_label_png
from zeroseg.evaluation.drawing import label_image, save_png

# Cityscapes label id -> train id of the 19 evaluated classes (cityscapesscripts' labels.py); the other ids
# 0..33 are ignored. (License plate, id -1, is never written into the labelIds maps.)
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
# stuffthingmaps value (COCO category id - 1; 255 unlabelled) -> COCO-Stuff-164k train id: the 80 thing
# categories in id order, then the 91 stuff categories 92..182; the 11 unused thing ids are ignored.
COCO_STUFF_TRAIN_IDS = {
    category - 1: index for index, category in enumerate([*sorted(COCO_CATEGORY_TO_INDEX), *range(92, 183)])
}


@dataclass(frozen=True)
class Conversion:
    """Where a benchmark's source maps lie under DATA_ROOT (`folder` with {split}, files `*<source_suffix>`,
    `nested` one folder deeper), what their converted twins are called, and the value table."""

    folder: str
    source_suffix: str
    target_suffix: str
    nested: bool
    table: np.ndarray  # [256] int16: stored value -> train id, -1 for a value the source never holds
    source: str  # what the source maps are, for messages

    def sources(self, data_root: Path, split: str) -> list[Path]:
        folder = Path(data_root) / self.folder.format(split=split)
        if not folder.is_dir():
            raise UserError(f"{self.source} folder {folder} not found")
        pattern = ("*/*" if self.nested else "*") + self.source_suffix
        found = sorted(p for p in folder.glob(pattern) if not p.name.endswith(self.target_suffix))
        if not found:
            raise UserError(f"{folder} holds no {self.source} (*{self.source_suffix})")
        return found


CONVERSIONS = {
    "cityscapes": Conversion(
        "cityscapes/gtFine/{split}", "_gtFine_labelIds.png", "_gtFine_labelTrainIds.png", True,
        lookup_table(dict.fromkeys(range(34), IGNORE_INDEX) | CITYSCAPES_TRAIN_IDS, -1), "gtFine label-id maps",
    ),
    "coco-stuff": Conversion(
        "coco_stuff164k/annotations/{split}", ".png", "_labelTrainIds.png", False,
        lookup_table(dict.fromkeys([*range(182), 255], IGNORE_INDEX) | COCO_STUFF_TRAIN_IDS, -1),
        "COCO-Stuff stuffthingmaps",
    ),
}  # fmt: skip


def convert_label_maps(conversion: Conversion, data_root: Path, split: str, progress: bool = True) -> int:
    """Write the train-id twin of every source map of `split` that has none; returns how many were written."""
    written = 0
    for source in tqdm(conversion.sources(data_root, split), desc="label maps", disable=not progress):
        target = source.with_name(source.name[: -len(conversion.source_suffix)] + conversion.target_suffix)
        if target.exists():
            continue
        values = read_label_png(source)  # [H, W]
        if values.dtype != np.uint8:
            raise UserError(f"{source} is not 8-bit: {conversion.source} hold values 0..255")
        train_ids = conversion.table[values]  # [H, W] int16
        if (train_ids < 0).any():
            raise UserError(f"{source} holds value {int(values[train_ids < 0][0])}, not a value of {conversion.source}")
        save_png(label_image(train_ids), target)
        written += 1
    return written
