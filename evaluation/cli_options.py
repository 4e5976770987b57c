"""Command-line options that zs-eval and zs-segment share (text side, labeling rule and geometry)."""

import math
import os
import tempfile
from pathlib import Path

import typer

from zeroseg.evaluation.windows import Geometry
from zeroseg.pipeline.errors import UserError

QUICK_GELU = typer.Option(
    None, "--quick-gelu/--no-quick-gelu", help="Force the CLIP's activation (default: recorded / automatic)."
)
TEMPLATES = typer.Option("single", help="Prompts: single ('a photo of a {}.'), openai80, or a file.")
TEXT_CACHE: Path | None = typer.Option(None, help="Text-embedding cache folder (default ~/.cache/zeroseg/text).")
MODE = typer.Option("whole", help="whole or slide (see zs-eval --help, Geometry).")
SHORT_SIDE = typer.Option(448, help="Short side of the resized image.")
MAX_LONG_SIDE = typer.Option(2048, help="Cap on the resized long side.")
CROP_SIZE = typer.Option(448, help="Slide window side (a multiple of the patch size).")
STRIDE = typer.Option(224, help="Slide window stride.")
RULE = typer.Option(
    "groupvit", help="Labeling rule: groupvit (GroupViT's, the paper's protocol) or softmax (see --help)."
)
TOP_K = typer.Option(5, help="groupvit rule: classes kept by the image-level prior (at most the vocabulary).")


def geometry_or_exit(mode: str, short_side: int, max_long_side: int, crop_size: int, stride: int) -> Geometry:
    """The Geometry of the options, or a UserError naming the bad one."""
    try:
        return Geometry(mode, short_side, max_long_side, crop_size, stride)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_geometry(given: dict) -> None:
    """UserError naming the bad one of the Geometry fields `given` (the others left at their defaults)."""
    geometry_or_exit(**{**vars(Geometry()), **given})


def check_rule(rule: str | None, top_k: int) -> None:
    """UserError for an unknown rule (None: the method's own) or a top-k below 1."""
    from zeroseg.evaluation.labeling_rule import RULES  # torch: imported once a command runs

    if rule is not None and rule not in RULES:
        raise UserError(f"--rule '{rule}' is not one of {', '.join(RULES)}")
    if top_k < 1:
        raise UserError(f"--top-k must be positive, got {top_k}")


def check_bg_threshold(value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise UserError(f"--bg-threshold must be a finite number, got {value}")


def check_writable_folder(folder: Path, option: str) -> None:
    """UserError now, before any work, when results could not be written into `folder` (made if missing)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} '{folder}' is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".zs-write-check-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{option} '{folder}' is not writable: {exc.strerror or exc}") from None


CHECKPOINT_HELP = (
    "A checkpoint (.pt) written by zs-train, a run folder (its latest checkpoint) or a folder written by "
    "zs-train export."
)
