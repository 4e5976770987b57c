"""Scoring saved label maps of any method against a dataset (the `zs-eval --predictions DIR` path).

DIR holds one PNG per image of the split, named <image id>.png, palette or greyscale (8 or 16 bit),
pixel values = class indices of the dataset's vocabulary. Pixels whose ground truth is the ignore
label are not scored, so their predicted value does not matter.
"""

from pathlib import Path

from tqdm import tqdm

from evaluation.datasets import SegmentationDataset, read_label_png
from evaluation.metrics import ConfusionMatrix, segmentation_results
from pipeline.errors import UserError


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


def score_predictions(
    dataset: SegmentationDataset, predictions_dir: str | Path, progress: bool = True
) -> dict:
    """The `segmentation_results` dict of the predictions in predictions_dir over the whole split."""
    paths = prediction_paths(dataset, predictions_dir)
    confusion = ConfusionMatrix(dataset.num_classes, dataset.ignore_index)
    for index, path in enumerate(tqdm(paths, desc=f"scoring {dataset.name}", disable=not progress)):
        labels = dataset.load_label(index)  # [H, W]
        predicted = read_label_png(path)  # [H, W]
        if predicted.shape != labels.shape:
            raise UserError(
                f"prediction {path} is {predicted.shape[1]}x{predicted.shape[0]}, "
                f"ground truth is {labels.shape[1]}x{labels.shape[0]}"
            )
        try:
            confusion.update(labels, predicted.astype("int64"))
        except ValueError as exc:
            raise UserError(f"prediction {path}: {exc}") from None
    return segmentation_results(confusion.matrix, dataset.class_names)
