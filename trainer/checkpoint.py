"""Checkpoints: the layout, atomic writes, the last K kept, the resume checks and the step of a file
(trainer.export loads a trained model from one).

A checkpoint is one `torch.save` file of tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`:

    format        FORMAT
    step          optimizer steps done; the sample stream position is step x effective_batch
    effective_batch, world_size
    model         state dict of the (unwrapped) ZeroSeg
    optimizer     AdamW state dict
    config        the effective TrainConfig as a nested dict (model section fully resolved)
    model_config  ModelConfig dict; loss_config: LossConfig dict (what evaluation needs)
    store         the store it was trained on: path, teacher identity, usable rows, grids, crop size, embed dim
    rng           global RNG states of rank 0: torch CPU, CUDA, numpy, python. The masking and Gumbel noise
                  comes from a generator reseeded for every device batch from (seed, step, batch index)
                  (trainer.train), so the step alone restores it.
    checksum      sha256 over every other entry (`payload_digest`): a flipped byte in a tensor, which torch.load
                  would read without a word, makes the checkpoint "damaged".

A checkpoint of another format is refused in one line naming its format and FORMAT.

Files are RUN_DIR/checkpoints/step-00001000.pt, each written under a temporary name, flushed to disk, then
renamed: a run killed while saving leaves the previous checkpoints untouched.
"""

import errno
import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zeroseg.errors import UserError
from zeroseg.io import atomic_path
from zeroseg.trainer.config import TrainConfig
from zeroseg.trainer.model import ZeroSeg

FORMAT = 2  # 2: the grouping cross-attention block lost its two input norms (GroupViT's block)
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"  # the effective config, beside checkpoints/; --resume continues with it


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step-*.pt"))


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory a checkpoint path names: the folder itself, or RUN of RUN/checkpoints/step-*.pt."""
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINT_DIR).is_dir():
        return path
    if path.is_file() and path.parent.name == CHECKPOINT_DIR:
        return path.parent.parent
    return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume_config_file(run_dir: str | Path) -> Path:
    """The config a resumed run continues with; UserError when the run directory has none."""
    saved = Path(run_dir) / CONFIG_FILE
    if not saved.is_file():
        raise UserError(f"nothing to resume: '{saved}' does not exist")
    return saved


def checkpoint_step(path: Path | None) -> int:
    """The optimizer steps done at a checkpoint file, read from its name (step-NNNNNNNN.pt); 0 for none."""
    return int(path.stem.split("-")[1]) if path is not None else 0


def save_checkpoint(
    cfg: TrainConfig,
    step: int,
    effective_batch: int,
    world_size: int,
    model: ZeroSeg,
    optimizer: torch.optim.Optimizer,
    store: dict[str, Any],
) -> Path:
    """Write the checkpoint of `step` into cfg.run.dir atomically; delete all but the last cfg.run.keep_last."""
    payload = {
        "format": FORMAT,
        "step": step,
        "effective_batch": effective_batch,
        "world_size": world_size,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": cfg.to_dict(),
        "model_config": cfg.model.to_dict(),
        "loss_config": cfg.loss.to_dict(),
        "store": store,
        "rng": rng_state(),
    }
    run_dir, keep_last = cfg.run.dir, cfg.run.keep_last
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as partial:
            torch.save({**payload, "checksum": payload_digest(payload)}, partial)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as "unexpected pos ..."
        failed_write = "unexpected pos" in str(exc) or "write failed" in str(exc)
        if getattr(exc, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) and not failed_write:
            raise
        raise UserError(
            f"no space left on device: checkpoint '{path}' could not be written; the earlier checkpoints are kept"
        ) from None
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink()
    return path


def payload_digest(payload: dict[str, Any]) -> str:
    """sha256 of a payload's keys, tensors (dtype, shape, bytes) and plain values, its "checksum" left out."""
    digest = hashlib.sha256()

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)}".encode())
            for key, item in value.items():
                digest.update(repr(key).encode())
                add(item)
        elif isinstance(value, list | tuple):
            digest.update(f"{type(value).__name__} {len(value)}".encode())
            for item in value:
                add(item)
        else:
            digest.update(repr(value).encode())

    add({key: value for key, value in payload.items() if key != "checksum"})
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of a checkpoint file (tensors on the CPU); UserError when it is missing, unreadable (e.g.
    truncated) or damaged (its checksum differs)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        pruned = "; a run keeps its last run.keep_last: give the run folder for its newest" if path.parent.name == \
            CHECKPOINT_DIR else ""
        raise UserError(f"checkpoint '{path}' does not exist{pruned}") from None
    except Exception as exc:
        raise UserError(f"checkpoint '{path}' cannot be read: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise UserError(f"'{path}' is not a zeroseg checkpoint: it records no format")
    if payload["format"] != FORMAT:
        raise UserError(f"checkpoint '{path}' is of format {payload['format']!r}; this zeroseg reads format {FORMAT}")
    if payload.get("checksum") != payload_digest(payload):
        raise UserError(f"checkpoint '{path}' is damaged: its contents do not match its checksum")
    return payload


def read_newest_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of a run and its payload, also while the run trains: a checkpoint that run.keep_last
    pruned between the listing and the opening is passed over for the newest one that exists then."""
    while True:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise UserError(f"run directory '{run_dir}' holds no checkpoint ({CHECKPOINT_DIR}/step-*.pt)")
        try:
            return found, read_checkpoint(found)
        except UserError:
            if found.exists():
                raise


def resume_payload(cfg: TrainConfig, store: dict[str, Any], resume: bool, log: Callable[[str], None]) -> dict | None:
    """The checkpoint to continue from (resume), after checking it fits this run's model, loss and store (`store`:
    what a checkpoint records of it, pipeline.store_reader.StoreReader.identity); None for a fresh run (whose run
    directory must then hold no checkpoint)."""
    if not resume:
        latest = latest_checkpoint(cfg.run.dir)
        if latest is not None:
            raise UserError(
                f"run directory '{cfg.run.dir}' already holds checkpoints (latest {latest.name}): "
                f"pass --resume to continue it, or choose another --run-dir"
            )
        return None
    good = read_latest_good(cfg.run.dir, log)
    if good is None:
        raise UserError(f"nothing to resume: run directory '{cfg.run.dir}' holds no checkpoint")
    latest, payload = good
    for name, current in (("model", cfg.model.to_dict()), ("loss", cfg.loss.to_dict())):
        saved = payload[f"{name}_config"]
        changed = sorted(key for key in current if _plain(current[key]) != _plain(saved[key]))
        if changed:
            key = changed[0]
            raise UserError(
                f"{latest} was trained with {name}.{key}={saved[key]!r}, this run sets {current[key]!r}: "
                f"a resumed run keeps the model and loss configuration"
            )
    trained, rows = payload["store"], store["rows"]
    if trained["rows"] > rows or trained["teacher"] != store["teacher"]:
        raise UserError(
            f"{latest} was trained on {trained['rows']} images of a store with teacher {trained['teacher']['model']}; "
            f"'{store['path']}' now holds {rows} with teacher {store['teacher']['model']}: "
            f"resume on the same store, or start a new run"
        )
    if trained["rows"] < rows:
        log(
            f"the store grew from {trained['rows']} to {rows} images since {latest.name}: training goes on "
            f"over all of them (the data order is recomputed, so this is a continuation, not an exact replay)"
        )
    return payload


def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


def check_effective_batch(payload: dict[str, Any], effective_batch: int) -> None:
    """A resumed run replays the sample stream from step x effective_batch: the batch must not change."""
    if payload["effective_batch"] != effective_batch:
        raise UserError(
            f"the checkpoint was trained with an effective batch of {payload['effective_batch']}; this run "
            f"has {effective_batch} (batch_size x accum_steps x processes): keep it to resume"
        )


def read_latest_good(run_dir: str | Path, log: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of a run that reads whole, and its payload; each damaged newer one is reported in
    one line (`log`). None when the run holds none; UserError when none of them reads."""
    found = list_checkpoints(run_dir)
    errors = []
    for path in reversed(found):
        try:
            payload = read_checkpoint(path)
        except UserError as exc:
            errors.append(str(exc))
            continue
        for error in errors:
            log(f"{error}: resuming from the previous checkpoint {path.name} instead")
        return path, payload
    if errors:
        raise UserError(f"no checkpoint of run directory '{run_dir}' is readable ({errors[0]})")
    return None


def rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():  # a resume may see fewer GPUs than the run that saved the states
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    saved = state["numpy"]
    np.random.set_state(
        ("MT19937", saved["keys"].numpy().astype(np.uint32), saved["position"], saved["has_gauss"],
         saved["cached_gaussian"])
    )
    random.setstate(state["python"])
