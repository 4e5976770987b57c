"""The configuration of a training run: six sections, read from YAML or TOML plus `section.key=value` overrides.

    model:     preset: base | tiny, then any ModelConfig field (trainer.model_config) overriding the preset
    loss:      LossConfig fields (trainer.losses)
    data:      the feature store, per-process batch size, loader workers, shuffle window
    optim:     AdamW (lr = base_lr * effective batch / 256 unless lr is set), accumulation, clipping
    schedule:  run length in epochs or steps, linear warm-up, half-cycle cosine to min_lr
    run:       run directory, checkpoint cadence, seed, device, bf16 autocast, logging cadence

A file may overlay a base config (`_base_: zeroseg-imagenet`) and state only what differs (read_config_file).
Precedence: dataclass defaults < the config file (merged over its bases) < overrides. Every key and value type
is checked here, every value by its section's dataclass when it is made (a UserError naming `section.key`), so
a typo is one clear error rather than a silently ignored setting. `TrainConfig.to_dict()` is the effective
configuration (the model section fully resolved), saved as `config.yaml` in the run directory.
"""

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zeroseg.errors import UserError, first_line, require
from zeroseg.trainer.losses import LossConfig
from zeroseg.trainer.model_config import ModelConfig, model_preset


def default_workers() -> int:
    """Loader workers per training process when none are set: the CPU cores it may run on, at most 8."""
    return min(8, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class DataConfig:
    """store: the feature store directory (zs-cache build).
    batch_size: images per process per forward pass; effective batch = batch_size x accum_steps x world size.
    workers: DataLoader processes per training process (0 = read in the training process); by default one per
        CPU core this process may run on, at most 8 (`default_workers`). The batches are laid out for this many
        readers (trainer.sampling), so a resumed run keeps the number in its config.yaml.
    shuffle_window: chunks whose rows are shuffled together (trainer.sampling); memory per worker is about
        2 x shuffle_window x accum_steps x chunk_size x (views x dim x 2 + crop_size^2 x 3 for a store with crops)
        bytes.
    prefetch: batches each worker prepares ahead.
    resize: accept a store whose crop size differs from model.image_size and resize the crops on the
        device (bicubic); off by default, as the student should see the exact pixels the teacher saw.
    """

    store: str = ""
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    shuffle_window: int = 16
    prefetch: int = 2
    resize: bool = False

    def __post_init__(self) -> None:
        _positive(self, "data", "batch_size", "shuffle_window", "prefetch")
        require(self.workers >= 0, f"data.workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class OptimConfig:
    """base_lr: lr per 256 images of effective batch (MAE's rule). lr: an absolute lr that replaces the rule.
    weight_decay: AdamW decay on every parameter of 2+ dimensions (MAE, GroupViT), mask and group tokens
    included unless decay_tokens is false; none on biases and norms.
    accum_steps: forward/backward passes per optimizer step. clip_grad: max global grad norm (None: off).
    """

    base_lr: float = 1.5e-4
    lr: float | None = None
    weight_decay: float = 0.05
    decay_tokens: bool = True
    betas: tuple[float, float] = (0.9, 0.95)
    accum_steps: int = 1
    clip_grad: float | None = None

    def __post_init__(self) -> None:
        _positive(self, "optim", "base_lr", "accum_steps")
        require(self.lr is None or self.lr >= 0, f"optim.lr must be >= 0, got {self.lr}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        require(self.clip_grad is None or self.clip_grad > 0,
                f"optim.clip_grad must be positive or null, got {self.clip_grad}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Run length and lr shape. steps / warmup_steps, when set, replace epochs / warmup_epochs; an epoch is
    one pass over the store's usable rows (`trainer.sampling`). The paper: 80 epochs, 20 of warm-up."""

    epochs: float = 80
    steps: int | None = None
    warmup_epochs: float = 20
    warmup_steps: int | None = None
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        _positive(self, "schedule", "epochs")
        require(self.steps is None or self.steps >= 1, f"schedule.steps must be >= 1, got {self.steps}")
        require(self.warmup_epochs >= 0 and (self.warmup_steps or 0) >= 0 and self.min_lr >= 0,
                "schedule.warmup_epochs, schedule.warmup_steps and schedule.min_lr must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    """dir: run directory (config.yaml, metrics.jsonl, checkpoints/, tensorboard/).
    checkpoint_every: optimizer steps between checkpoints (one is always written at the end).
    keep_last: checkpoints kept. log_every: optimizer steps per metrics line.
    device: auto (cuda:LOCAL_RANK when a GPU is visible, else cpu), cpu, cuda or cuda:K (single process).
    bf16: bf16 autocast on CUDA (ignored on the CPU).
    compile: torch.compile the student (its DDP wrapper under torchrun) before the first step (opt-in; the first
        steps then take the compile time).
    """

    dir: str = ""
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 20
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        _positive(self, "run", "checkpoint_every", "keep_last", "log_every")


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "base"
    model: ModelConfig = field(default_factory=lambda: model_preset("base"))
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples) with the model section fully resolved."""
        sections = {name: asdict(getattr(self, name)) for name in SECTIONS if name != "model"}
        return _lists({"model": {"preset": self.preset, **self.model.to_dict()}, **sections})


SECTION_TYPES = {
    "model": ModelConfig, "loss": LossConfig, "data": DataConfig, "optim": OptimConfig,
    "schedule": ScheduleConfig, "run": RunConfig,
}  # fmt: skip
SECTIONS = tuple(SECTION_TYPES)
BASE_KEY = "_base_"  # names the config a file overlays


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The nested dict of a .yaml/.yml or .toml file, or of a config shipped with zeroseg named without its
    suffix (zeroseg-imagenet, the ablations, tiny-cpu: see zeroseg.configs), with its bases merged in.

    A file may name a base, `_base_: NAME_OR_PATH` (a shipped config's name, or a path relative to the file),
    as GroupViT's load_config: the base is read the same way (bases of bases too), then the file's sections
    are merged over it key by key; a list replaces the base's list. A cycle of bases is refused.
    """
    return _read_with_bases(_locate(str(path), Path(), None), ())


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """path's values over those of its chain of bases; chain: the files that named this one, first to last."""
    if path.resolve() in chain:
        cycle = " -> ".join(str(link) for link in (*chain, path.resolve()))
        raise UserError(f"config file '{chain[0]}' has a cycle of bases: {cycle}")
    values = _read_one(path)
    base = values.pop(BASE_KEY, None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise UserError(f"config file '{path}': {BASE_KEY} must be one config name or path, got {base!r}")
    base_values = _read_with_bases(_locate(base, path.parent, path), (*chain, path.resolve()))
    return _merge(base_values, values)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """over merged into base: mappings key by key (recursively), anything else (lists included) replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _locate(name: str, folder: Path, named_by: Path | None) -> Path:
    """The file `name` relative to `folder`, or the shipped config of that name; UserError naming the file
    that named it when neither exists."""
    from zeroseg.configs import TRAIN_SUFFIXES, shipped_config, shipped_names

    path = folder / name
    if not path.is_file() and path.suffix not in TRAIN_SUFFIXES and len(Path(name).parts) == 1:
        path = shipped_config(name, TRAIN_SUFFIXES) or path
    if not path.is_file():
        shipped = ", ".join(shipped_names(TRAIN_SUFFIXES))
        missing = f"config file '{path}'" if named_by is None else f"base '{name}' of config file '{named_by}'"
        raise UserError(f"{missing} does not exist (configs shipped with zeroseg, by name: {shipped})")
    return path


def _read_one(path: Path) -> dict[str, Any]:
    """The nested dict of one .yaml/.yml or .toml file, its own values only."""
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(path.read_text()) or {}
        else:
            raise UserError(f"config file '{path}' must end in .yaml, .yml or .toml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"config file '{path}' is not valid: {first_line(exc)}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file '{path}' must hold a mapping of sections")
    return values


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value); the value is read as YAML (1e-3, true, [1, 2], null)."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise UserError(f"--set takes section.key=value (e.g. optim.lr=1e-3), got '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return section, key, value


def build_config(
    file_values: dict[str, Any], overrides: list[str], explicit: dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults < file_values < overrides ('section.key=value' texts) < explicit ({'section.key': value}),
    every key and type checked (UserError otherwise)."""
    merged: dict[str, dict[str, Any]] = {}
    for section, values in file_values.items():
        if section not in SECTION_TYPES:
            raise UserError(f"unknown config section '{section}' (sections: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise UserError(f"config section '{section}' must be a mapping of keys to values")
        merged[section] = dict(values)
    parsed = [parse_override(text) for text in overrides]
    parsed += [(*name.split(".", 1), value) for name, value in (explicit or {}).items()]
    for section, key, value in parsed:
        if section not in SECTION_TYPES:
            raise UserError(f"unknown config section in '{section}.{key}' (sections: {', '.join(SECTIONS)})")
        merged.setdefault(section, {})[key] = value

    model_values = dict(merged.pop("model", {}))
    preset = model_values.pop("preset", "base")
    model = ModelConfig(**{**model_preset(preset).to_dict(), **_checked("model", ModelConfig, model_values)})
    sections = {name: cls(**_checked(name, cls, merged.get(name, {}))) for name, cls in SECTION_TYPES.items()
                if name != "model"}
    return TrainConfig(preset=preset, model=model, **sections)


def config_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _checked(section: str, cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """values with every key known to `cls` and every value converted to the field's declared type."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    checked = {}
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"unknown config key '{section}.{key}' ({section} keys: {', '.join(known)})")
        try:
            checked[key] = _convert(value, hints[key])
        except (TypeError, ValueError):
            raise UserError(f"config key '{section}.{key}' expects {_type_name(hints[key])}, got {value!r}") from None
    return checked


def _convert(value: Any, hint: Any) -> Any:
    """value as an instance of the type hint (int, float, bool, str, tuples, Literal, X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(value, next(a for a in args if a is not type(None)))
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(value)
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise TypeError(value)
        item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ValueError(value)
        return tuple(_convert(item, item_type) for item, item_type in zip(value, item_types))
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(value)
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    raise TypeError(hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_lists(item) for item in value]
    return value


def _positive(values: Any, section: str, *names: str) -> None:
    for name in names:
        require(getattr(values, name) > 0, f"{section}.{name} must be positive, got {getattr(values, name)}")
