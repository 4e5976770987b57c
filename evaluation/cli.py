"""`zs-eval`: zero-shot mIoU on the benchmarks of evaluation.datasets, `zs-eval prepare` (the label maps a
benchmark needs from its official download) and `zs-eval compare`;
the options zs-segment shares with it (their values are checked by evaluation.loading.ModelOptions)."""

import gc
import os
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import typer

from zeroseg.errors import UserError, require
from zeroseg.evaluation.datasets import (
    DATA_LAYOUT,
    DATASET_NAMES,
    DATASETS,
    GROUPVIT_THRESHOLDS,
    open_dataset,
    prepared_coco_dir,
)
from zeroseg.evaluation.methods import METHODS, TRAINING_FREE
from zeroseg.pipeline.options import DEFAULT_MAX_PIXELS
from zeroseg.runtime import DEVICE_HELP, run_cli

CHECKPOINT_HELP = (
    "A checkpoint (.pt) written by zs-train, a run folder (its latest checkpoint), a folder written by "
    "zs-train export, or hf-hub:ORG/REPO (such a folder on the Hugging Face Hub; HF_HUB_OFFLINE=1: from the cache)."
)
QUICK_GELU = typer.Option(
    None, "--quick-gelu/--no-quick-gelu", help="Force the CLIP's activation (default: recorded / automatic)."
)
TEXT_CACHE: Path | None = typer.Option(None, help="Text-embedding cache folder (default ~/.cache/zeroseg/text).")
MAX_LONG_SIDE = typer.Option(2048, help="Cap on the resized long side.")
TOP_K = typer.Option(5, help="groupvit rule: classes kept by the image-level prior (at most the vocabulary).")


def max_pixels_option(what_happens: str):
    """--max-pixels as zs-cache's (its default; the header check of pipeline.images), saying what becomes of such
    an image."""
    return typer.Option(DEFAULT_MAX_PIXELS, min=1, help="Images of more pixels (width x height, read from the "
                        f"header before decoding: decompression bombs) {what_happens}")


ZEROSEG = METHODS["zeroseg"]  # the defaults the option texts name


def methods_help() -> str:
    """Each method of evaluation.methods.METHODS: its last block and its settings, wrapped, kept as written."""
    width, indent = 108, " " * 13
    lines = []
    for name, method in METHODS.items():
        block = method.last_block.formula if method.last_block else "the ZeroSeg student of --checkpoint"
        lines.append(f"  {name:<10} {block}")
        lines += textwrap.wrap(method.describe(), width, initial_indent=indent, subsequent_indent=indent,
                               break_on_hyphens=False)  # fmt: skip
    return "\b\n" + "\n".join(lines)


HELP = """
Labeling rules (--rule). Class names (index 0 'background' excluded) go through the text tower of the
teacher CLIP recorded in the checkpoint (or --teacher/--pretrained), one embedding per name: the mean
of the L2-normalised prompt embeddings, normalised again. With s = min(exp(logit_scale), 100) of that
CLIP (or --temperature), A = softmax over the foreground classes of cos(e, t_c) * s.
groupvit (zeroseg's default, GroupViT's encode_decode, which the paper follows): per window, the top-k
classes (--top-k, 5) of the image embedding z's softmax are the image prior; every segment's A
restricted to them and softmaxed again, times A, is its score P; window pixels take the scores of their
argmax segment (soft assignments of the grouping stages, chained and resized bilinearly to the window);
a pixel's background channel is 1 where its best score < min(threshold, best P of the window).
[background, class scores] are averaged over the windows on the resized image (mmseg), resized once
bilinearly to the original size, argmax (background wins ties). softmax (the rule before, to reproduce
old numbers): scores A, no prior; background where the best fused score is strictly below the fused
threshold (--keep-best-group caps it at the window's best score).
{TRAINING_FREE_NAMES} (training-free, the CLIP's last image block changed as each paper defines it;
MaskCLIP is Zhou et al., ECCV 2022, not the "MaskCLIP" row of the ZeroSeg paper's Table 1, Dong et al.):
their own order (SCLIP's code): the cosines of every patch with every name, resized bilinearly to the
window, averaged over windows, resized to the original size, (PAMR, --pamr), softmax over all names of
cosine * s, a class scores the max over its names (the method's names file, line 0 the background
class), small classes dropped (--area-filter), argmax, background below the threshold. Thresholds per
dataset: the method's, else the paper's ({PAPER_THRESHOLDS}; --thresholds groupvit: GroupViT's configs'
{GROUPVIT_THRESHOLDS}), or --bg-threshold. Benchmarks without a background
class ({NO_BACKGROUND}): every name goes through the text tower and every pixel takes its best class
(labels and saved predictions 0..C-1); no threshold, no background names.

Methods (--model), their last image block and their defaults, each an option (the training-free
methods' from their code):

{METHODS_HELP}

Geometry (mmcv / mmseg 0.x, as GroupViT's test pipeline). Images are resized keeping their aspect ratio
to --short-side (long side capped at --max-long-side), bilinear, each side int(side * scale + 0.5) (not
rounded to the patch), and normalised with the checkpoint's mean/std (the training-free methods: the
CLIP's). slide (zeroseg's default, GroupViT's setting for VOC, Context and COCO): --crop-size windows
every --stride pixels of the resized image. whole: one forward of the resized image. Window maps are
fused on the resized image and resized once to the original size, where the metric is computed.

Metric. One int64 confusion matrix over the whole split (ignore label left out); per-class IoU, mIoU
over the classes present in ground truth or prediction (the others are listed as absent), pixel
accuracy. Run under torchrun to shard images over processes; their matrices are summed.

Label maps from official downloads: zs-eval prepare coco --help (COCO-Object from an instances
JSON), zs-eval prepare cityscapes --help, zs-eval prepare coco-stuff --help (train ids, as
mmsegmentation's converters write them). One table from several
reports (methods as rows, datasets as columns): zs-eval compare --help.
""".format(
    TRAINING_FREE_NAMES=", ".join(TRAINING_FREE),
    PAPER_THRESHOLDS=", ".join(f"{s.bg_threshold:g} {name}" for name, s in DATASETS.items() if s.has_background),
    NO_BACKGROUND=", ".join(name for name, spec in DATASETS.items() if not spec.has_background),
    GROUPVIT_THRESHOLDS=", ".join(f"{value:g} {name}" for name, value in GROUPVIT_THRESHOLDS.items()),
    METHODS_HELP=methods_help(),
)

LAYOUT_HELP = DATA_LAYOUT.replace("\n\n", "\n\n\b\n", 1)  # click keeps a paragraph after \b as written

app = typer.Typer(pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)
prepare_app = typer.Typer(
    pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None
)


@app.command(help=f"Zero-shot segmentation mIoU of DATASET... ({', '.join(DATASET_NAMES)}).\n{HELP}\n{LAYOUT_HELP}")
def evaluate(
    datasets: list[str] = typer.Argument(
        ..., metavar="DATASET", help=f"One or more of {', '.join(DATASET_NAMES)}.", show_default=False
    ),
    data_root: Path = typer.Option(
        ..., "--data-root", help="Folder holding the benchmarks' folders (Data layout below)."
    ),
    checkpoint: str | None = typer.Option(None, help=CHECKPOINT_HELP),
    model: str = typer.Option(
        "zeroseg", help=f"zeroseg (needs --checkpoint), or training-free: {', '.join(TRAINING_FREE)}."
    ),
    predictions: Path | None = typer.Option(
        None, help="Score saved label PNGs instead (<image id>.png in DIR/<dataset>/ if present, else DIR)."
    ),
    teacher: str | None = typer.Option(
        None, help="open_clip name, hf-hub:ORG/REPO, local-dir:FOLDER or config JSON of the CLIP for the text side "
        "(default: the checkpoint's)."
    ),
    pretrained: str | None = typer.Option(
        None, help="Its weights: open_clip tag, weights file or 'none' (default: the checkpoint's; baselines: openai)."
    ),
    quick_gelu: bool | None = QUICK_GELU,
    templates: str | None = typer.Option(None, help="Prompts: single, openai80, or a file (default: the method's)."),
    text_cache: Path | None = TEXT_CACHE,
    rule: str | None = typer.Option(
        None, help="Labeling rule: groupvit (GroupViT's, the paper's protocol) or softmax (default: the method's)."
    ),
    top_k: int = TOP_K,
    mode: str | None = typer.Option(None, help=f"slide or whole (default: the method's; zeroseg {ZEROSEG.mode})."),
    short_side: int | None = typer.Option(
        None, help=f"Short side of the resized image (default: the method's; zeroseg {ZEROSEG.short_side})."
    ),
    max_long_side: int | None = typer.Option(
        None, help=f"Cap on the resized long side (default: the method's; zeroseg {ZEROSEG.max_long_side})."
    ),
    crop_size: int | None = typer.Option(
        None, help=f"Slide window side (default: the method's; zeroseg {ZEROSEG.crop_size})."
    ),
    stride: int | None = typer.Option(
        None, help=f"Slide window stride (default: the method's; zeroseg {ZEROSEG.stride})."
    ),
    bg_threshold: float | None = typer.Option(
        None, help="Background threshold for every dataset with background (default: the method's, else the paper's)."
    ),
    thresholds: str = typer.Option(
        "paper", help="Datasets' background thresholds: paper (ZeroSeg's) or groupvit (GroupViT's configs')."
    ),
    area_filter: bool = typer.Option(True, help="SCLIP's area_thd where the method's settings have one (sclip voc)."),
    pamr: bool = typer.Option(True, help="NACLIP's PAMR (10 steps) where the method's settings run it (naclip)."),
    temperature: float | None = typer.Option(
        None, help="Multiplies cosines before the class softmax (default: the method's; zeroseg: the CLIP's)."
    ),
    background_names: str | None = typer.Option(
        None, help="Dense models: comma-separated names scored as the background class, or 'none'."
    ),
    gaussian_std: float | None = typer.Option(
        None, help=f"NACLIP: neighbourhood prior std in patches (default {METHODS['naclip'].gaussian_std:g})."
    ),
    keep_best_group: bool = typer.Option(
        False, help="softmax rule: never make a window's best-scoring segment background (groupvit always)."
    ),
    split: str | None = typer.Option(None, help="Split (default: " + ", ".join(
        f"{spec.default_split} {name}" for name, spec in DATASETS.items()) + ")."),
    out: Path | None = typer.Option(
        None, help="Results folder (default: <checkpoint>-eval/ next to it, or ./zs-eval-results/<model>)."
    ),
    save_predictions: Path | None = typer.Option(None, help="Write label PNGs to DIR/<dataset>/<image id>.png."),
    save_vis: Path | None = typer.Option(
        None, help="Write DIR/<dataset>/<image id>.png: ground truth beside prediction, legend of pixel shares."
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    decode_threads: int | None = typer.Option(None, help="Threads decoding images ahead of the model [default: 2]."),
    max_pixels: int = max_pixels_option("stop the evaluation with an error naming the image."),
    window_batch: int = typer.Option(8, help="Windows per forward pass in slide mode."),
    progress: bool = typer.Option(True, help="Show a progress bar (rank 0)."),
) -> None:
    from zeroseg import process_group
    from zeroseg.evaluation.evaluate import results_document, score_saved_predictions, write_results
    from zeroseg.evaluation.loading import ModelOptions, load_eval_model
    from zeroseg.evaluation.scores import format_results

    decode_threads = 2 if decode_threads is None else decode_threads
    opened = [(open_dataset(name, data_root, split, max_pixels), split or DATASETS[name].default_split)
              for name in datasets]
    given = {"mode": mode, "short_side": short_side, "max_long_side": max_long_side, "crop_size": crop_size}
    geometry = {name: value for name, value in {**given, "stride": stride}.items() if value is not None}
    options = ModelOptions(
        model, checkpoint, teacher, pretrained, quick_gelu, templates, str(text_cache) if text_cache else None,
        geometry, keep_best_group, window_batch, rule, top_k, temperature, background_names, gaussian_std,
        bg_threshold=bg_threshold, thresholds=thresholds, area_filter=area_filter, pamr=pamr,
        predictions=str(predictions) if predictions else None,
    )  # fmt: skip
    out_dir = out or _default_output(options)
    protocol = {  # the settings given that change the numbers: they name the run's TensorBoard tags
        "split": split, "rule": rule, "top_k": None if top_k == TOP_K.default else top_k, "templates": templates,
        **geometry, "max_long_side": None if max_long_side == MAX_LONG_SIDE.default else max_long_side,
        "bg_threshold": bg_threshold, "thresholds": None if thresholds == "paper" else thresholds,
        "temperature": temperature, "keep_best_group": keep_best_group or None,
    }  # fmt: skip
    for folder, option in ((out_dir, "--out"), (save_predictions, "--save-predictions"), (save_vis, "--save-vis")):
        if folder is not None:
            check_writable_folder(folder, option)
    process = process_group.setup(device)
    loaded = None
    try:
        if predictions is None:
            loaded = load_eval_model(options, process.device)
            if not loaded.description.get("teacher_matches_checkpoint", True):
                typer.echo("warning: the text-side CLIP is not the teacher recorded in the checkpoint", err=True)
        for dataset, dataset_split in opened:
            if loaded is None:
                folder = predictions / dataset.name if (predictions / dataset.name).is_dir() else predictions
                confusion = score_saved_predictions(dataset, folder, process, progress)
                config = {"model": "predictions", "predictions": str(folder.resolve())}
            else:
                threshold = bg_threshold if bg_threshold is not None and dataset.has_background else None
                threshold = loaded.default_bg_threshold(dataset) if threshold is None else threshold
                saving = [folder / dataset.name if folder else None for folder in (save_predictions, save_vis)]
                confusion, config = _segment_dataset(
                    loaded, dataset, threshold, process, saving, decode_threads, progress
                )
            if process.is_main:
                config = {**config, "data_root": str(data_root.resolve()), "world_size": process.world_size}
                document = results_document(dataset, dataset_split, confusion, config)
                json_path, _ = write_results(document, out_dir)
                typer.echo(_summary_line(document))
                typer.echo(format_results(document, markdown=False))
                typer.echo(f"results: {json_path} (and .md)")
                if loaded is not None and options.model == "zeroseg":
                    _log_to_run(checkpoint, document, loaded.description.get("step"), protocol)
    finally:
        del loaded
        gc.collect()
        process_group.shutdown(process)


def check_writable_folder(folder: Path, option: str) -> None:
    """UserError now, before any work, when results could not be written into `folder`, or, while it does not
    exist, into the nearest folder above it (where the writers make it). Nothing is made here, so a run that
    fails leaves no empty folder behind."""
    nearest = next(path for path in (folder.absolute(), *folder.absolute().parents) if path.exists())
    if not nearest.is_dir():
        raise UserError(f"{option} '{folder}': '{nearest}' is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".zs-write-check-", dir=nearest)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{option} '{folder}' is not writable: {exc.strerror or exc}") from None


def _segment_dataset(loaded, dataset, threshold, process, saving, decode_threads: int, progress: bool):
    """(confusion matrix, config) of one dataset; its segmenter is released on return."""
    from zeroseg.evaluation.evaluate import segment_split, write_run_record

    segmenter = loaded.segmenter(dataset.class_names, threshold, dataset.name, dataset.has_background)
    started = time.time()
    confusion = segment_split(dataset, segmenter, process, *saving, workers=decode_threads, progress=progress)
    if saving[0] is not None and process.is_main:
        run = {key: loaded.description.get(key) for key in ("model", "checkpoint", "step")}
        write_run_record(saving[0], dataset.name, started, run)
    config = {
        **loaded.description,
        "labeling": {
            **segmenter.rule.to_dict(), "thresholds": loaded.options.thresholds,
            "names_file": METHODS[loaded.options.model].on(dataset.name).names,  # of evaluation/names; None: ours
        },
        "geometry": vars(segmenter.geometry),
        "templates": list(loaded.templates),
        "normalisation": {"mean": list(loaded.mean), "std": list(loaded.std)},
    }
    return confusion, config


def _log_to_run(checkpoint: str, document: dict, step: int | None, protocol: dict) -> None:
    """Scores of a checkpoint of a run folder go into the run's TensorBoard events at the checkpoint's step, tagged
    eval/<dataset>/<score> under the default protocol, else eval/<dataset>/<setting=value,...>/<score> (the given
    settings that change the numbers), so evaluations under other settings never share a curve."""
    from zeroseg.trainer.checkpoint import run_dir_of
    from zeroseg.trainer.metrics_log import log_scalars

    run_dir = run_dir_of(checkpoint)
    scores = {key: document[key] for key in ("mIoU", "mAcc", "pixel_accuracy") if document[key] is not None}
    if run_dir is None or step is None or not scores:
        return
    settings = ",".join(f"{name}={value}" for name, value in protocol.items() if value is not None)
    prefix = f"eval/{document['dataset']}/" + (f"{settings}/" if settings else "")
    tags = {f"{prefix}{key}": value for key, value in scores.items()}
    if log_scalars(run_dir, tags, step):
        typer.echo(f"logged {', '.join(tags)} at step {step} to {run_dir}/tensorboard")


def _default_output(options) -> Path:
    from zeroseg.evaluation.loading import HUB_PREFIX

    if options.predictions is not None:
        return Path("zs-eval-results") / "predictions"
    if options.model == "zeroseg" and options.checkpoint and options.checkpoint.startswith(HUB_PREFIX):
        return Path("zs-eval-results") / options.checkpoint.removeprefix(HUB_PREFIX).replace("/", "--")
    if options.model == "zeroseg" and options.checkpoint:
        checkpoint = Path(options.checkpoint)
        return checkpoint.parent / f"{checkpoint.stem}-eval"
    return Path("zs-eval-results") / options.model


def _summary_line(document: dict) -> str:
    absent = len(document["absent_classes"])
    miou, macc, accuracy = ("n/a" if document[key] is None else f"{document[key]:.2f}"
                            for key in ("mIoU", "mAcc", "pixel_accuracy"))  # fmt: skip
    return (
        f"{document['dataset']} {document['split']} ({document['num_images']} images): mIoU {miou} over "
        f"{document['classes_in_mean']} classes ({absent} absent, left out), mAcc {macc}, pixel accuracy {accuracy}"
    )


@dataclass(frozen=True)
class CocoTarget:
    """Where `zs-eval prepare coco` writes: --out, else where zs-eval looks under --data-root."""

    data_root: Path | None
    out: Path | None
    split: str

    def __post_init__(self) -> None:
        require(self.out is not None or self.data_root is not None,
                "give --data-root (to write where zs-eval looks) or --out")

    @property
    def folder(self) -> Path:
        return self.out or prepared_coco_dir(self.data_root, self.split)


@prepare_app.callback()
def prepare() -> None:
    """Make the label maps a benchmark needs from its official annotations."""


@prepare_app.command("coco")
def prepare_coco(
    instances: Path = typer.Option(..., help="COCO instances JSON, e.g. annotations/instances_val2017.json."),
    data_root: Path | None = typer.Option(
        None, help="Write to DATA_ROOT/coco/coco_object/<split>/ (where zs-eval looks)."
    ),
    out: Path | None = typer.Option(None, help="Write to this folder instead."),
    split: str = typer.Option("val2017", help="Split name used under --data-root."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """COCO-Object label maps (0 background, 1..80 things; one PNG per image) from an instances JSON."""
    from zeroseg.evaluation.coco_prepare import prepare_coco_object

    target = CocoTarget(data_root, out, split).folder
    written = prepare_coco_object(instances, target, progress=progress)
    typer.echo(f"wrote {written} COCO-Object label maps to {target}")


def _train_id_command(benchmark: str):
    """`zs-eval prepare <benchmark>`: train-id label maps (evaluation.train_ids.CONVERSIONS) beside their sources."""
    from zeroseg.evaluation.train_ids import CONVERSIONS

    conversion = CONVERSIONS[benchmark]

    def command(
        data_root: Path = typer.Option(..., help="The --data-root of zs-eval (Data layout: zs-eval --help)."),
        split: str = typer.Option(DATASETS[benchmark].default_split, help="Split folder."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        from zeroseg.evaluation.train_ids import convert_label_maps

        written = convert_label_maps(conversion, data_root, split, progress)
        typer.echo(f"wrote {written} {benchmark} train-id label maps (*{conversion.target_suffix})")

    command.__doc__ = (
        f"{benchmark} label maps *{conversion.target_suffix} from the {conversion.source} "
        f"DATA_ROOT/{conversion.folder.format(split='<split>')}/{'<city>/' if conversion.nested else ''}"
        f"*{conversion.source_suffix}, "
        "as mmsegmentation's converter writes them."
    )
    return command


for _benchmark in ("cityscapes", "coco-stuff"):
    prepare_app.command(_benchmark)(_train_id_command(_benchmark))


compare_app = typer.Typer(pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)


@compare_app.command()
def compare(
    reports: list[Path] = typer.Argument(
        ..., metavar="REPORT", help="zs-eval results JSONs (<dataset>.json).", show_default=False
    ),
    out: Path = typer.Option(
        Path("zs-eval-compare"), help="Folder to write compare.md (the table) and compare.png (a bar chart) into."
    ),
) -> None:
    """One mIoU table from REPORT... (methods as rows, datasets as columns), printed, as Markdown and PNG."""
    from zeroseg.evaluation.compare import comparison_table, format_table, write_comparison

    check_writable_folder(out, "--out")
    methods, datasets, cells = comparison_table(reports)
    typer.echo(format_table(methods, datasets, cells, markdown=False))
    markdown_path, png_path = write_comparison(methods, datasets, cells, out)
    typer.echo(f"table: {markdown_path} and {png_path}")


def main() -> None:
    os.environ.setdefault("TQDM_MININTERVAL", "0.5")
    if sys.argv[1:2] == ["prepare"]:
        sys.argv = [sys.argv[0], *sys.argv[2:]]
        run_cli(partial(prepare_app, prog_name="zs-eval prepare"))
    if sys.argv[1:2] == ["compare"]:
        sys.argv = [sys.argv[0], *sys.argv[2:]]
        run_cli(partial(compare_app, prog_name="zs-eval compare"))
    run_cli(partial(app, prog_name="zs-eval"))


if __name__ == "__main__":
    main()
