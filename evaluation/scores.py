"""mIoU from one confusion matrix over a whole split (rows: ground truth, columns: prediction).

The matrix is an int64 torch tensor, so processes of a torch.distributed run each fill their own
and `ConfusionMatrix.all_reduce` sums them before the scores are computed: the same numbers as one
process over the whole split. Pixels whose ground truth is the ignore label never enter it.
"""

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist


def confusion_matrix(labels, predictions, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """labels, predictions: [...] integer arrays (numpy or torch, same shape) -> [C, C] int64.

    Raises ValueError when a kept pixel holds a class index outside 0..C-1 in either array.
    """
    labels = torch.as_tensor(labels)
    predictions = torch.as_tensor(predictions, device=labels.device)
    if labels.shape != predictions.shape:
        raise ValueError(f"prediction shape {tuple(predictions.shape)} != label shape {tuple(labels.shape)}")
    kept = labels != ignore_index
    truth = labels[kept].long()  # [P]
    predicted = predictions[kept].long()  # [P]
    for name, values in (("ground truth", truth), ("prediction", predicted)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            bad = values[(values < 0) | (values >= num_classes)][0].item()
            raise ValueError(f"{name} holds class index {bad}, outside 0..{num_classes - 1}")
    counts = torch.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates `confusion_matrix` over a split; `matrix` is [C, C] int64 on `device`."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, labels, predictions) -> None:
        counts = confusion_matrix(labels, predictions, self.num_classes, self.ignore_index)
        self.matrix += counts.to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrices of all processes in place (no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)


def per_class_iou(matrix) -> np.ndarray:
    """[C, C] counts -> [C] float64 IoU in 0..1; NaN for a class absent from ground truth and prediction."""
    counts = torch.as_tensor(matrix).cpu().numpy().astype(np.float64)
    intersection = np.diag(counts)
    union = counts.sum(axis=0) + counts.sum(axis=1) - intersection
    iou = np.full(len(counts), np.nan)
    np.divide(intersection, union, out=iou, where=union > 0)
    return iou


def segmentation_results(matrix, class_names: Sequence[str]) -> dict:
    """Scores in percent. mIoU averages the classes present in ground truth or prediction; the others
    are listed in 'absent_classes' and have IoU None. A class only predicted counts with IoU 0. mAcc averages
    the per-class accuracy (correct pixels / ground-truth pixels) over the classes in ground truth, as mmseg's
    IoUMetric does."""
    counts = torch.as_tensor(matrix).cpu().numpy()
    if len(class_names) != len(counts):
        raise ValueError(f"{len(class_names)} class names for a {len(counts)}-class confusion matrix")
    iou = per_class_iou(counts)
    present = ~np.isnan(iou)
    total = int(counts.sum())
    in_truth = counts.sum(axis=1) > 0
    accuracy = np.diag(counts)[in_truth] / counts.sum(axis=1)[in_truth]  # [classes in ground truth]
    return {
        "mIoU": float(100 * iou[present].mean()) if present.any() else None,
        "mAcc": float(100 * accuracy.mean()) if in_truth.any() else None,
        "pixel_accuracy": float(100 * np.trace(counts) / total) if total else None,
        "num_pixels": total,
        "num_classes": len(class_names),
        "classes_in_mean": int(present.sum()),
        "per_class_iou": {
            name: (float(100 * value) if ok else None)
            for name, value, ok in zip(class_names, iou, present, strict=True)
        },
        "absent_classes": [name for name, ok in zip(class_names, present, strict=True) if not ok],
    }


def format_results(results: dict, markdown: bool = True) -> str:
    """A per-class IoU table followed by the summary rows; Markdown or aligned plain text."""
    rows = [(name, _percent(value)) for name, value in results["per_class_iou"].items()]
    rows += [
        (f"mIoU ({results['classes_in_mean']} classes)", _percent(results["mIoU"])),
        ("mAcc", _percent(results["mAcc"])),
        ("pixel accuracy", _percent(results["pixel_accuracy"])),
    ]
    if markdown:
        header = ["| class | IoU (%) |", "|---|---:|"]
        return "\n".join(header + [f"| {name} | {value} |" for name, value in rows])
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>7}" for name, value in rows)


def _percent(value: float | None) -> str:
    return "absent" if value is None else f"{value:.2f}"
