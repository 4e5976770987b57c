"""Configurations that ship with zeroseg (installed as the `zeroseg.configs` package data), reachable by name:

    zeroseg-imagenet          the paper's training run (ICCV 2023, Sec. 4.1): zs-train run --config zeroseg-imagenet
    ablation-*                the paper's ablations (Tables 3-5), each the paper run with one change
    tiny-cpu                  a minute-scale CPU run of the tiny student on the demo store
    zs-tiny-clip              a tiny open_clip model config for tests and demos: zs-cache build --teacher zs-tiny-clip
"""

from importlib.resources import files
from pathlib import Path

TRAIN_SUFFIXES = (".yaml", ".yml", ".toml")
TEACHER_SUFFIXES = (".json",)


def shipped_config(name: str, suffixes: tuple[str, ...]) -> Path | None:
    """The shipped file `name` + one of `suffixes`, or None."""
    for suffix in suffixes:
        candidate = files(__name__) / f"{name}{suffix}"
        if candidate.is_file():
            return Path(str(candidate))
    return None


def shipped_names(suffixes: tuple[str, ...]) -> list[str]:
    return sorted(Path(entry.name).stem for entry in files(__name__).iterdir() if Path(entry.name).suffix in suffixes)
