"""Saved label maps of any method, read for `zs-eval --predictions DIR` (evaluate.score_saved_predictions).

DIR holds one PNG per image of the split, named <image id>.png, palette or greyscale (8 or 16 bit),
pixel values = class indices of the dataset's vocabulary. Pixels whose ground truth is the ignore
label are not scored, so their predicted value does not matter.

`zs-eval --save-predictions` also writes RUN_RECORD into each folder: which model saved the maps and
when. Scoring warns when some maps were written outside that run (a folder mixing two runs' files).
"""

import json
import time
from pathlib import Path

import numpy as np

from zeroseg.errors import UserError
from zeroseg.evaluation.datasets import SegmentationDataset, read_label_png
from zeroseg.evaluation.scores import ConfusionMatrix
from zeroseg.io import write_atomically

RUN_RECORD = "zs-eval-run.json"
CLOCK_SLACK_S = 2.0  # file-system timestamps vs time.time(), and ranks that start a moment apart


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


def write_run_record(folder: Path, dataset: str, started: float, run: dict) -> None:
    """Record in `folder` that the maps saved there since `started` (time.time()) come from `run`."""
    record = {"dataset": dataset, "started": started, "finished": time.time(), "run": run}
    write_atomically(folder / RUN_RECORD, json.dumps(record, indent=1))


def mixed_runs_warning(folder: Path, paths: list[Path]) -> str | None:
    """A warning line when some of `paths` were not written by the run recorded in `folder`, else None."""
    try:
        record = json.loads((folder / RUN_RECORD).read_text())
        started, finished = float(record["started"]), float(record["finished"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return f"warning: {folder / RUN_RECORD} is damaged: cannot tell whether all predictions come from one run"
    outside = [
        path for path in paths
        if not started - CLOCK_SLACK_S <= path.stat().st_mtime <= finished + CLOCK_SLACK_S
    ]  # fmt: skip
    if not outside:
        return None
    saved_at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    return (
        f"warning: {len(outside)} of {len(paths)} predictions in {folder} were not written by the run that saved "
        f"this folder ({record.get('run', {}).get('model', '?')} at {saved_at}), e.g. {outside[0].name}: "
        "the folder mixes files of different runs"
    )
