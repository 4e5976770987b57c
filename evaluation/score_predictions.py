"""Saved label maps of any method, read for `zs-eval --predictions DIR` (evaluate.score_saved_predictions).

DIR holds one PNG per image of the split, named <image id>.png, palette or greyscale (8 or 16 bit),
pixel values = class indices of the dataset's vocabulary. Pixels whose ground truth is the ignore
label are not scored, so their predicted value does not matter.
"""

from pathlib import Path

import numpy as np

from zeroseg.evaluation.datasets import SegmentationDataset, read_label_png
from zeroseg.evaluation.scores import ConfusionMatrix
from zeroseg.pipeline.errors import UserError


def prediction_paths(dataset: SegmentationDataset, predictions_dir: str | Path) -> list[Path]:
    """<dir>/<image id>.png for every sample; UserError naming the first one missing."""
    directory = Path(predictions_dir)
    if not directory.is_dir():
        raise UserError(f"predictions folder {directory} not found")
    paths = [directory / f"{sample.image_id}.png" for sample in dataset.samples]
    missing = next((path for path in paths if not path.is_file()), None)
    if missing is not None:
        raise UserError(f"prediction {missing} missing: expected one <image id>.png per {dataset.name} image")
    return paths


def read_prediction(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The saved label map [H, W] int64; UserError when it is not the ground truth's size."""
    predicted = read_label_png(path)  # [H, W]
    if predicted.shape != shape:
        raise UserError(
            f"prediction {path} is {predicted.shape[1]}x{predicted.shape[0]}, ground truth is {shape[1]}x{shape[0]}"
        )
    return predicted.astype(np.int64)


def add_prediction(confusion: ConfusionMatrix, labels: np.ndarray, predicted: np.ndarray, source) -> None:
    """confusion.update, with a class index out of range reported as a UserError naming `source`."""
    try:
        confusion.update(labels, predicted)
    except ValueError as exc:
        raise UserError(f"prediction {source}: {exc}") from None
