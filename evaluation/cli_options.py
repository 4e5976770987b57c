"""Command-line options that zs-eval and zs-segment share (text side, labeling rule and geometry; their values
are checked by evaluation.loading.ModelOptions), and the check that an output folder can be written."""

import os
import tempfile
from pathlib import Path

import typer

from zeroseg.errors import UserError

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
