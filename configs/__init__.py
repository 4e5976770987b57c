"""Configurations that ship with zeroseg (installed as the `zeroseg.configs` package data), reachable by name:

    zeroseg-imagenet          the paper's training run (ICCV 2023, Sec. 4.1): zs-train run --config zeroseg-imagenet
    table3-*, table4-*,       in ablations/: the paper's ablations (Tables 3-5) and a w_match sweep, each an overlay
    table5-*, w-match-*       `_base_: zeroseg-imagenet` stating only the ablated keys (ablations/README.md),
                              e.g. --config table4-base
    tiny-cpu                  a minute-scale CPU run of the tiny student on the demo store
    zs-tiny-clip              a tiny open_clip model config for tests and demos: zs-cache build --teacher zs-tiny-clip
"""

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

TRAIN_SUFFIXES = (".yaml", ".yml", ".toml")
TEACHER_SUFFIXES = (".json",)


def _folders() -> list[Traversable]:
    """The package folder, then ablations/ (a name is looked up in this order)."""
    return [files(__name__), files(__name__) / "ablations"]


def shipped_config(name: str, suffixes: tuple[str, ...]) -> Path | None:
    """The shipped file `name` + one of `suffixes`, or None."""
    for folder in _folders():
        for suffix in suffixes:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return Path(str(candidate))
    return None


def shipped_names(suffixes: tuple[str, ...]) -> list[str]:
    entries = [entry for folder in _folders() for entry in folder.iterdir()]
    return sorted(Path(entry.name).stem for entry in entries if entry.is_file() and Path(entry.name).suffix in suffixes)
