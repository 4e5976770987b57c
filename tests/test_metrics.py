import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from tests.conftest import SAMPLES, VOC_ROOT
from zeroseg.errors import UserError
from zeroseg.evaluation.datasets import SegmentationDataset, open_dataset
from zeroseg.evaluation.evaluate import score_saved_predictions
from zeroseg.evaluation.scores import (
    ConfusionMatrix,
    confusion_matrix,
    format_results,
    per_class_iou,
    segmentation_results,
)
from zeroseg.process_group import Process

VOC_LABELS = VOC_ROOT / "SegmentationClass"

# 5 classes; class 3 is only predicted, class 4 is in neither; one pixel is ignored (255).
TRUTH = np.array([[0, 0, 1], [1, 255, 2]], dtype=np.uint8)
PREDICTED = np.array([[0, 1, 1], [1, 0, 3]], dtype=np.uint8)


def test_confusion_matrix_counts_kept_pixels_by_truth_row_and_prediction_column():
    expected = torch.zeros(5, 5, dtype=torch.int64)
    for truth, predicted in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 3)]:
        expected[truth, predicted] += 1
    from_numpy = confusion_matrix(TRUTH, PREDICTED, num_classes=5)
    from_torch = confusion_matrix(torch.from_numpy(TRUTH), torch.from_numpy(PREDICTED).long(), num_classes=5)
    assert from_numpy.dtype == torch.int64
    assert torch.equal(from_numpy, expected)
    assert torch.equal(from_torch, expected)


def test_miou_leaves_out_classes_absent_from_truth_and_prediction():
    results = segmentation_results(confusion_matrix(TRUTH, PREDICTED, 5), ["bg", "a", "b", "c", "d"])
    # IoU = tp / (tp + fp + fn): bg 1/2, a 2/3, b 0/1, c 0/1 (predicted only), d absent.
    expected_iou = {"bg": 50.0, "a": 200 / 3, "b": 0.0, "c": 0.0, "d": None}
    assert results["per_class_iou"] == pytest.approx(expected_iou)
    assert results["absent_classes"] == ["d"]
    assert results["classes_in_mean"] == 4
    assert results["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 4)
    assert results["pixel_accuracy"] == pytest.approx(60.0)
    assert results["num_pixels"] == 5
    assert np.isnan(per_class_iou(confusion_matrix(TRUTH, PREDICTED, 5))[4])


def test_accumulation_equals_one_matrix_over_everything():
    accumulated = ConfusionMatrix(num_classes=5)
    accumulated.update(TRUTH[:1], PREDICTED[:1])
    accumulated.update(TRUTH[1:], PREDICTED[1:])
    assert torch.equal(accumulated.matrix, confusion_matrix(TRUTH, PREDICTED, 5))


def test_out_of_range_prediction_is_rejected_but_not_under_ignored_pixels():
    with pytest.raises(ValueError, match="class index 7"):
        confusion_matrix(TRUTH, np.full_like(PREDICTED, 7), num_classes=5)
    under_ignore = PREDICTED.copy()
    under_ignore[1, 1] = 200
    assert confusion_matrix(TRUTH, under_ignore, num_classes=5).sum() == 5


def test_format_results_lists_every_class_and_the_mean():
    results = segmentation_results(confusion_matrix(TRUTH, PREDICTED, 5), ["bg", "a", "b", "c", "d"])
    markdown = format_results(results)
    assert "| a | 66.67 |" in markdown and "| d | absent |" in markdown
    assert "| mIoU (4 classes) | 29.17 |" in markdown
    plain = format_results(results, markdown=False)
    assert "|" not in plain and "29.17" in plain


def _sum_across_two_processes(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    confusion = ConfusionMatrix(num_classes=5)
    confusion.update(TRUTH[rank : rank + 1], PREDICTED[rank : rank + 1])
    confusion.all_reduce()
    results[rank] = confusion.matrix.clone()
    dist.destroy_process_group()


def test_all_reduce_sums_the_matrices_of_all_processes(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        args = (str(tmp_path / "init"), results)
        mp.start_processes(_sum_across_two_processes, args=args, nprocs=2, start_method="fork")
        summed = [results[0], results[1]]
    expected = confusion_matrix(TRUTH, PREDICTED, 5)
    assert torch.equal(summed[0], expected) and torch.equal(summed[1], expected)


def _ground_truth_as_predictions(tmp_path: Path) -> Path:
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    for image_id in ("2007_000033", "2007_000123"):
        shutil.copy(VOC_LABELS / f"{image_id}.png", predictions / f"{image_id}.png")
    return predictions


def score_predictions(dataset: SegmentationDataset, predictions: Path) -> dict:
    """zs-eval --predictions in one CPU process: the saved label maps' confusion matrix, then its scores."""
    process = Process(0, 1, 0, torch.device("cpu"))
    confusion = score_saved_predictions(dataset, predictions, process, progress=False)
    return segmentation_results(confusion.matrix, dataset.class_names)


def test_ground_truth_scored_as_predictions_is_perfect(tmp_path):
    results = score_predictions(open_dataset("voc", SAMPLES), _ground_truth_as_predictions(tmp_path))
    assert results["mIoU"] == 100.0
    assert results["pixel_accuracy"] == 100.0
    assert sorted(name for name, iou in results["per_class_iou"].items() if iou is not None) == [
        "aeroplane",
        "background",
        "train",
    ]


def test_a_wrong_region_scores_the_hand_counted_value(tmp_path):
    predictions = _ground_truth_as_predictions(tmp_path)
    truth_033 = np.asarray(Image.open(VOC_LABELS / "2007_000033.png"))
    truth_123 = np.asarray(Image.open(VOC_LABELS / "2007_000123.png"))
    rows, cols = np.nonzero(truth_033 == 1)
    top, bottom = rows.min(), (rows.min() + rows.max()) // 2
    left, right = cols.min(), (cols.min() + cols.max()) // 2
    wrong = truth_033.copy()
    wrong[top:bottom, left:right] = 0  # background painted over the aeroplane's top-left quarter
    Image.fromarray(wrong).save(predictions / "2007_000033.png")

    moved = int((truth_033[top:bottom, left:right] == 1).sum())  # aeroplane pixels now called background
    aeroplane = int((truth_033 == 1).sum())
    background = int((truth_033 == 0).sum() + (truth_123 == 0).sum())
    assert aeroplane == 300 * 120 and moved == 59 * 149  # rows 100..158, columns 100..248 of the 300 x 120 box
    expected_iou = {
        "background": 100 * background / (background + moved),
        "aeroplane": 100 * (aeroplane - moved) / aeroplane,
        "train": 100.0,
    }

    results = score_predictions(open_dataset("voc", SAMPLES), predictions)
    scored = {name: iou for name, iou in results["per_class_iou"].items() if iou is not None}
    assert scored == pytest.approx(expected_iou, rel=1e-12)
    assert results["mIoU"] == pytest.approx(sum(expected_iou.values()) / 3, rel=1e-12)


def test_missing_and_mis_sized_predictions_are_user_errors(tmp_path):
    dataset = open_dataset("voc", SAMPLES)
    predictions = _ground_truth_as_predictions(tmp_path)
    (predictions / "2007_000033.png").unlink()
    with pytest.raises(UserError, match="2007_000033.png missing"):
        score_predictions(dataset, predictions)
    Image.new("L", (10, 10)).save(predictions / "2007_000033.png")
    with pytest.raises(UserError, match="is 10x10, ground truth is 500x366"):
        score_predictions(dataset, predictions)
    Image.fromarray(np.full((366, 500), 21, dtype=np.uint8)).save(predictions / "2007_000033.png")
    with pytest.raises(UserError, match="class index 21"):
        score_predictions(dataset, predictions)


def test_macc_averages_the_accuracy_of_the_classes_in_ground_truth():
    counts = torch.tensor([[3, 1, 0], [2, 2, 0], [0, 0, 0]])  # class 2 neither in ground truth nor predicted
    results = segmentation_results(counts, ["a", "b", "c"])
    assert results["mAcc"] == pytest.approx(100 * (3 / 4 + 2 / 4) / 2)
    assert results["mIoU"] == pytest.approx(100 * (3 / 6 + 2 / 5) / 2)
    assert results["pixel_accuracy"] == pytest.approx(100 * 5 / 8)
