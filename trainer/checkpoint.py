"""Checkpoints: atomic writes, the last K kept, exact resume, and `load_model` for evaluation.

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

Files are RUN_DIR/checkpoints/step-00001000.pt, each written under a temporary name, flushed to disk, then
renamed: a run killed while saving leaves the previous checkpoints untouched.
"""

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zeroseg.pipeline.atomic import atomic_path
from zeroseg.pipeline.errors import UserError
from zeroseg.trainer.config import ModelConfig
from zeroseg.trainer.model import ZeroSeg

FORMAT = 1
CHECKPOINT_DIR = "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step-*.pt"))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, payload: dict[str, Any], keep_last: int) -> Path:
    """Write payload as the checkpoint of step payload["step"] atomically; delete all but the last keep_last."""
    path = checkpoint_path(run_dir, payload["step"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:
        torch.save(payload, partial)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink()
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of a checkpoint file (tensors on the CPU); UserError when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint '{path}' cannot be read: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"'{path}' is not a zeroseg checkpoint of format {FORMAT}")
    return payload


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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ZeroSeg, dict[str, Any]]:
    """A trained ZeroSeg in eval mode on `device`, and the checkpoint's metadata.

    path: a checkpoint file, or a run directory (its latest checkpoint). The metadata dict holds step,
    effective_batch, world_size, config, model_config, loss_config, store and path (the file read).
    """
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise UserError(f"run directory '{path}' holds no checkpoint ({CHECKPOINT_DIR}/step-*.pt)")
        path = found
    payload = read_checkpoint(path)
    model = ZeroSeg(ModelConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    metadata = {key: value for key, value in payload.items() if key not in ("model", "optimizer", "rng", "format")}
    return model, {**metadata, "path": str(path)}
