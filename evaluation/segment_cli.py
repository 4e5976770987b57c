"""`zs-segment`: open-vocabulary segmentation of any images with a ZeroSeg checkpoint."""

import gc
import json
import os
from collections import Counter
from functools import partial
from pathlib import Path

import typer

from zeroseg.errors import UserError
from zeroseg.evaluation.cli import (
    CHECKPOINT_HELP,
    MAX_LONG_SIDE,
    QUICK_GELU,
    TEXT_CACHE,
    TOP_K,
    check_writable_folder,
    max_pixels_option,
)
from zeroseg.evaluation.datasets import DATASET_NAMES, DATASETS
from zeroseg.pipeline.sources import IMAGE_EXTENSIONS
from zeroseg.runtime import DEVICE_HELP, bar_disabled, run_cli

IMAGENET_VOCABULARY_NAMES = ("imagenet", "imagenet1k")

app = typer.Typer(pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)


@app.command(
    help="""Segment IMAGE... (files, or folders searched recursively) into the classes of a vocabulary.

For each image, written under --out with the image's name (its path below a folder argument, or its
file stem): NAME.png, the label map (palette PNG, pixel value = class index in the vocabulary, 0 =
background; 16-bit greyscale when a class index above 255 occurs); NAME-overlay.png, the
image with class colours blended in and a legend; NAME.json, its segments (one per class present:
class, index, pixel share, score = mean over its pixels of the winning class score). zs-segment.json
holds the vocabulary and the settings.

Labeling is zs-eval's (--rule groupvit or softmax; see zs-eval --help): each segment token of the
student scores the classes with the teacher CLIP's text embeddings (groupvit: restricted to the top-k
classes of the image embedding), pixels take their segment's scores through the composed soft group
assignments. By default there is no background: every segment gets a class. With --bg-threshold T a
pixel whose best score is below T (groupvit: below min(T, the window's best score)) is background (0).

Unreadable images, and images of more than --max-pixels pixels, are reported one line each and skipped;
the exit code is then 1.""",
)
def segment(
    images: list[Path] = typer.Argument(..., metavar="IMAGE", help="Image files or folders.", show_default=False),
    checkpoint: str = typer.Option(..., help=CHECKPOINT_HELP),
    classes: str | None = typer.Option(None, help='Comma-separated class names, e.g. "cat,dog,grass,sky".'),
    vocabulary: str | None = typer.Option(
        None, help=f"imagenet1k, {', '.join(DATASET_NAMES)}, or a text file with one class name per line."
    ),
    out: Path = typer.Option(Path("zs-segment-out"), help="Output folder."),
    bg_threshold: float | None = typer.Option(None, help="Background below this score (default: no background)."),
    keep_best_group: bool = typer.Option(
        False, help="softmax rule with --bg-threshold: the best segment is never background (groupvit always)."
    ),
    rule: str = typer.Option(
        "groupvit", help="Labeling rule: groupvit (GroupViT's, the paper's protocol) or softmax (see --help)."
    ),
    top_k: int = TOP_K,
    teacher: str | None = typer.Option(None, help="CLIP for the text side (default: the checkpoint's teacher)."),
    pretrained: str | None = typer.Option(None, help="Its weights: open_clip tag, file, or 'none'."),
    quick_gelu: bool | None = QUICK_GELU,
    templates: str = typer.Option("single", help="Prompts: single ('a photo of a {}.'), openai80, or a file."),
    text_cache: Path | None = TEXT_CACHE,
    mode: str = typer.Option("whole", help="whole or slide (see zs-eval --help, Geometry)."),
    short_side: int = typer.Option(448, help="Short side of the resized image."),
    max_long_side: int = MAX_LONG_SIDE,
    crop_size: int = typer.Option(448, help="Slide window side (a multiple of the patch size)."),
    stride: int = typer.Option(224, help="Slide window stride."),
    max_pixels: int = max_pixels_option("are reported in one line and skipped, as unreadable images are."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    from tqdm import tqdm

    from zeroseg.evaluation.drawing import label_image, overlay, save_png
    from zeroseg.evaluation.loading import ModelOptions, load_eval_model
    from zeroseg.evaluation.segmenter import describe_segments
    from zeroseg.io import write_atomically
    from zeroseg.pipeline.images import ImageDecodeError, decode_image
    from zeroseg.runtime import resolve_device

    class_names = read_vocabulary(classes, vocabulary)
    geometry = {"mode": mode, "short_side": short_side, "max_long_side": max_long_side, "crop_size": crop_size,
                "stride": stride}  # fmt: skip
    options = ModelOptions(
        "zeroseg", checkpoint, teacher, pretrained, quick_gelu, templates, str(text_cache) if text_cache else None,
        geometry, keep_best_group, rule=rule, top_k=top_k, bg_threshold=bg_threshold,
    )  # fmt: skip
    check_writable_folder(Path(out), "--out")
    inputs = collect_images(images, out)
    loaded = load_eval_model(options, resolve_device(device))
    segmenter = loaded.segmenter(class_names, options.bg_threshold)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**loaded.description, "labeling": segmenter.rule.to_dict(), "geometry": vars(segmenter.geometry)}
    write_atomically(out / "zs-segment.json", json.dumps({**settings, "class_names": list(class_names)}, indent=1))
    failed = 0
    for path, name in tqdm(inputs, desc="segmenting", disable=bar_disabled(progress)):
        try:
            image = decode_image(path.read_bytes(), max_pixels)
        except (OSError, ImageDecodeError) as exc:
            typer.echo(f"error: {path}: {exc}", err=True)
            failed += 1
            continue
        result = segmenter.segment(image)
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        save_png(label_image(result.labels), target.with_name(f"{target.name}.png"))
        save_png(overlay(image, result.labels, class_names), target.with_name(f"{target.name}-overlay.png"))
        record = {"image": str(path), "width": image.width, "height": image.height}
        record["segments"] = describe_segments(result, class_names)
        write_atomically(target.with_name(f"{target.name}.json"), json.dumps(record, indent=1) + "\n")
    del loaded, segmenter
    gc.collect()
    typer.echo(f"segmented {len(inputs) - failed} of {len(inputs)} images into {out}")
    if failed:
        typer.echo(f"error: {failed} image(s) could not be read", err=True)
        raise typer.Exit(1)


def read_vocabulary(classes: str | None, vocabulary: str | None) -> tuple[str, ...]:
    """('background', class 1, class 2, ...) from --classes or --vocabulary (exactly one of them)."""
    if (classes is None) == (vocabulary is None):
        raise UserError('give exactly one of --classes "a,b,c" and --vocabulary NAME_OR_FILE')
    if vocabulary in IMAGENET_VOCABULARY_NAMES:
        import open_clip  # and torch: only when asked for

        return ("background",) + tuple(open_clip.IMAGENET_CLASSNAMES)  # the CLIP paper's cleaned list
    if vocabulary in DATASETS:
        spec = DATASETS[vocabulary]
        return spec.class_names if spec.has_background else ("background", *spec.class_names)
    if vocabulary is not None:
        path = Path(vocabulary)
        if not path.is_file():
            known = ", ".join([*IMAGENET_VOCABULARY_NAMES, *DATASET_NAMES])
            raise UserError(f"--vocabulary '{vocabulary}' is neither a file nor one of {known}")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        source = str(path)
    else:
        names = [name.strip() for name in classes.split(",")]
        source = "--classes"
    if not names or any(not name for name in names):
        raise UserError(f"{source}: class names must be non-empty (got {names})")
    duplicate = next((name for name, count in Counter(names).items() if count > 1), None)
    if duplicate is not None:
        raise UserError(f"{source}: class '{duplicate}' is listed twice")
    return ("background", *names)


def collect_images(arguments: list[Path], out: Path) -> list[tuple[Path, str]]:
    """(image path, output name) for every file argument and every image file below a folder argument
    (files under the output folder `out` excluded, so a rerun does not segment its own outputs)."""
    found: list[tuple[Path, str]] = []
    for argument in arguments:
        if argument.is_dir():
            files = sorted(p for p in argument.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            files = [path for path in files if not path.resolve().is_relative_to(out.resolve())]
            found += [(path, str(path.relative_to(argument).with_suffix(""))) for path in files]
        elif argument.is_file():
            found.append((argument, argument.stem))
        else:
            raise UserError(f"{argument} does not exist")
    if not found:
        raise UserError("no images found in the given paths")
    clash = next((name for name, count in Counter(name for _, name in found).items() if count > 1), None)
    if clash is not None:
        raise UserError(f"two inputs would both be written as '{clash}'; segment them in separate runs")
    return found


def main() -> None:
    os.environ.setdefault("TQDM_MININTERVAL", "0.5")
    run_cli(partial(app, prog_name="zs-segment"))


if __name__ == "__main__":
    main()
