"""Training metrics, written, read back and plotted: one JSON line per logging interval in RUN_DIR/metrics.jsonl
(`MetricsLog`, read back by `read_metrics`, drawn by `zs-train plot` into RUN_DIR/curves.png), plus TensorBoard
event files in RUN_DIR/tensorboard when the optional `tensorboard` package is installed (train/<key> per step; a
resumed run purges the points after its checkpoint, so a crash and resume leaves no duplicates; zs-eval adds
eval/<dataset>/{mIoU,pixel_accuracy} at the evaluated checkpoint's step).

Keys of every line (loss terms and grad_norm averaged over the optimizer steps of the interval and over
the processes):
    step          optimizer steps done
    epoch         passes over the store's usable rows done (fractional)
    lr            learning rate of the interval's last step
    loss          the weighted total loss
    recon         masked-patch reconstruction MSE
    distill       multi-scale distillation of z
    match         segment matching of g
    grad_norm     global gradient norm before clipping
    images_per_s  images per second, all processes together
    data_wait     fraction of the interval that rank 0 spent waiting for batches
    elapsed_s     seconds since this invocation of zs-train started
"""

import json
from pathlib import Path
from typing import Any

from zeroseg.errors import UserError
from zeroseg.io import atomic_path, write_atomically
from zeroseg.trainer.losses import LOSS_TERMS

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "curves.png"
METRIC_KEYS = ("step", "epoch", "lr", "loss", *LOSS_TERMS, "grad_norm", "images_per_s", "data_wait", "elapsed_s")


class MetricsLog:
    """Appends metric lines; a resumed run first drops the lines of steps after its checkpoint."""

    def __init__(self, run_dir: str | Path, resumed_step: int | None):
        self.path = Path(run_dir) / METRICS_FILE
        kept = []
        if resumed_step is not None and self.path.exists():
            kept = [line for line in _records(self.path.read_text()) if json.loads(line)["step"] <= resumed_step]
        write_atomically(self.path, "".join(f"{line}\n" for line in kept))
        purge_step = None if resumed_step is None else resumed_step + 1  # points of steps > the checkpoint's go
        self.tensorboard = _tensorboard_writer(Path(run_dir) / TENSORBOARD_DIR, purge_step)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({key: record[key] for key in METRIC_KEYS}) + "\n")
        if self.tensorboard is not None:
            for key in METRIC_KEYS[1:]:
                self.tensorboard.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"'{run_dir}' holds no {METRICS_FILE}: is it a zs-train run directory?")
    records = [json.loads(line) for line in _records(path.read_text())]
    if not records:
        raise UserError(f"'{path}' is empty: the run has not logged a step yet")
    return records


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss terms, learning rate, throughput and data wait against the optimizer step as one PNG (matplotlib, Agg
    backend); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    marker = "o" if len(records) == 1 else None  # a line through one point draws nothing
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    losses = axes[0, 0]
    for key in ("loss", *LOSS_TERMS):
        losses.plot(steps, [r[key] for r in records], label=key, marker=marker)
    losses.set_yscale("log")
    losses.set_title("loss terms")
    losses.legend()
    for axis, key, title in (
        (axes[0, 1], "lr", "learning rate"),
        (axes[1, 0], "images_per_s", "images / s (all processes)"),
        (axes[1, 1], "data_wait", "fraction of time waiting for data"),
    ):
        axis.plot(steps, [r[key] for r in records], marker=marker)
        axis.set_title(title)
    for axis in axes[1]:
        axis.set_xlabel("optimizer step")
    figure.suptitle(str(run_dir))
    figure.tight_layout()
    path = Path(out) if out is not None else Path(run_dir) / PLOT_FILE
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=100, format="png")
    plt.close(figure)
    return path


def log_scalars(run_dir: str | Path, scalars: dict[str, float], step: int) -> bool:
    """Add scalars at `step` to the run's TensorBoard events; False when tensorboard is not installed."""
    writer = _tensorboard_writer(Path(run_dir) / TENSORBOARD_DIR, None)
    if writer is None:
        return False
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    writer.close()
    return True


def _tensorboard_writer(folder: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


def _records(text: str) -> list[str]:
    """The complete lines of a metrics file: a run killed while appending leaves a torn last line."""
    lines = []
    for line in text.splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        lines.append(line)
    return lines
