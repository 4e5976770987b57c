"""zs-eval's core: label every image of a split (segment it, or read a saved PNG), one confusion matrix,
the scores, and the files (results JSON + Markdown, prediction PNGs, overlays).

Saved label maps of any method are scored by `zs-eval --predictions DIR`: DIR holds one PNG per image of the
split, named <image id>.png, palette or greyscale (8 or 16 bit), pixel values = class indices of the dataset's
vocabulary. Pixels whose ground truth is the ignore label are not scored, so their predicted value does not
matter. `zs-eval --save-predictions` also writes RUN_RECORD into each folder: which model saved the maps and
when. Scoring warns when some maps were written outside that run (a folder mixing two runs' files).
"""

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zeroseg import __version__
from zeroseg.errors import UserError
from zeroseg.evaluation.datasets import SegmentationDataset, read_label_png
from zeroseg.evaluation.drawing import label_image, overlay, save_png
from zeroseg.evaluation.scores import ConfusionMatrix, format_results, segmentation_results
from zeroseg.evaluation.segmenter import WindowSegmenter
from zeroseg.io import remove_dead_partials, write_atomically
from zeroseg.process_group import Process
from zeroseg.runtime import bar_disabled, prefetch_map

RUN_RECORD = "zs-eval-run.json"
CLOCK_SLACK_S = 2.0  # file-system timestamps vs time.time(), and ranks that start a moment apart


def segment_split(
    dataset: SegmentationDataset,
    segmenter: WindowSegmenter,
    process: Process,
    save_predictions: Path | None = None,
    save_vis: Path | None = None,
    workers: int = 2,
    progress: bool = True,
    on_image: Callable[[float, float], None] | None = None,
) -> ConfusionMatrix:
    """Segment this process's share of the split; the returned matrix is summed over all processes.

    Images are decoded `workers` threads ahead of the model. on_image(load_s, segment_s) is called per
    image with the seconds spent waiting for its decode and segmenting it (for benchmarks).
    """
    confusion = ConfusionMatrix(dataset.num_classes, dataset.ignore_index, device=process.device)
    indices = process.shard(range(len(dataset)))
    items = prefetch_map(dataset.__getitem__, indices, workers, ahead=2 * max(1, workers))
    label = dataset.name if process.world_size == 1 else f"{dataset.name} (rank 0 of {process.world_size})"
    bar = tqdm(total=len(indices), desc=label, disable=bar_disabled(progress and process.is_main))
    for _ in indices:
        waited = time.perf_counter()
        image_id, image, labels = next(items)
        started = time.perf_counter()
        predicted = segmenter.segment(image).labels  # [H, W]
        confusion.update(labels, predicted)
        if on_image is not None:
            on_image(started - waited, time.perf_counter() - started)
        if save_predictions is not None:
            save_png(label_image(predicted), save_predictions / f"{image_id}.png")
        if save_vis is not None:
            picture = overlay(image, predicted, dataset.class_names, ignore_index=dataset.ignore_index, truth=labels)
            save_png(picture, save_vis / f"{image_id}.png")
        bar.update()
    bar.close()
    confusion.all_reduce()
    return confusion


def score_saved_predictions(
    dataset: SegmentationDataset,
    predictions_dir: Path,
    process: Process,
    progress: bool = True,
    warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> ConfusionMatrix:
    """The confusion matrix of saved <image id>.png label maps (any method's), sharded like segment_split;
    `warn` hears when the folder's run record says some maps come from another run."""
    paths = prediction_paths(dataset, predictions_dir)
    note = mixed_runs_warning(predictions_dir, paths) if process.is_main else None
    if note:
        warn(note)
    confusion = ConfusionMatrix(dataset.num_classes, dataset.ignore_index, device=process.device)
    indices = process.shard(range(len(dataset)))
    for index in tqdm(indices, desc=f"scoring {dataset.name}", disable=bar_disabled(progress and process.is_main)):
        labels = dataset.load_label(index)  # [H, W]
        try:
            confusion.update(labels, read_prediction(paths[index], labels.shape))
        except ValueError as exc:  # a class index out of range
            raise UserError(f"prediction {paths[index]}: {exc}") from None
    confusion.all_reduce()
    return confusion


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


def results_document(dataset: SegmentationDataset, split: str, confusion: ConfusionMatrix, config: dict) -> dict:
    """Scores (metrics.segmentation_results), the raw confusion matrix and the run's configuration."""
    return {
        "dataset": dataset.name,
        "split": split,
        "num_images": len(dataset),
        **segmentation_results(confusion.matrix, dataset.class_names),
        "confusion_matrix": confusion.matrix.cpu().tolist(),
        "config": {**config, "package_version": __version__, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }


def write_results(document: dict, out_dir: Path) -> tuple[Path, Path]:
    """<out_dir>/<dataset>.json and <dataset>.md (the per-class table), each written atomically (and what a killed
    writer left there removed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_dead_partials(out_dir)
    json_path = out_dir / f"{document['dataset']}.json"
    markdown_path = out_dir / f"{document['dataset']}.md"
    write_atomically(json_path, _json_with_matrix_rows(document))
    summary = f"# {document['dataset']} {document['split']}: mIoU {_percent(document['mIoU'])}\n\n"
    absent = document["absent_classes"]
    note = f"\n\nLeft out of the mean (in neither ground truth nor prediction): {', '.join(absent)}." if absent else ""
    if "method" in document["config"]:
        note += f"\n\nMethod: {document['config']['method']}."
    produced = "\n".join(provenance(document["config"]))
    write_atomically(markdown_path, summary + produced + "\n\n" + format_results(document) + note + "\n")
    return json_path, markdown_path


def provenance(config: dict) -> list[str]:
    """Markdown bullets saying what produced the scores: model, checkpoint and step, teacher, the labeling rule
    with its thresholds, the geometry's mode (every labeling and geometry field the config holds), and the
    zeroseg version and date."""
    lines = [f"- model: {config.get('model')}"]
    if "checkpoint" in config:
        lines.append(f"- checkpoint: `{config['checkpoint']}`, step {config.get('step')}")
    if "predictions" in config:
        lines.append(f"- predictions: `{config['predictions']}`")
    teacher = config.get("teacher")
    if teacher:
        lines.append(f"- teacher: {teacher['model']} ({teacher.get('pretrained') or 'random weights'})")
    labeling = dict(config.get("labeling") or {})
    if labeling:
        threshold = labeling.pop("bg_threshold", None)
        lines.append(f"- background threshold: {'none' if threshold is None else threshold}")
        name = labeling.pop("rule", "softmax")  # reports before the groupvit rule existed have no name
        details = ", ".join(f"{key} {value}" for key, value in labeling.items() if value is not None)
        lines.append(f"- rule: {name} ({details})")
    geometry = dict(config.get("geometry") or {})
    if geometry:
        mode = geometry.pop("mode", None)
        lines.append(f"- mode: {mode} (" + ", ".join(f"{key} {value}" for key, value in geometry.items()) + ")")
    if "package_version" in config:
        lines.append(f"- zeroseg {config['package_version']}, finished {config.get('finished')}")
    return lines


def _json_with_matrix_rows(document: dict) -> str:
    """Indented JSON, with each confusion matrix row on one line."""
    placeholder = "@confusion_matrix@"
    text = json.dumps({**document, "confusion_matrix": placeholder}, indent=1)
    rows = ",\n  ".join(json.dumps(row) for row in document["confusion_matrix"])
    return text.replace(json.dumps(placeholder), f"[\n  {rows}\n ]") + "\n"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
