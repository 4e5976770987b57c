"""Command-line options that zs-eval and zs-segment share (text side and geometry)."""

from pathlib import Path

import typer

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
CHECKPOINT_HELP = (
    "A checkpoint (.pt) written by zs-train, a run folder (its latest checkpoint) or a folder written by "
    "zs-train export."
)
