"""`zs-train plot`: the curves of a run's metrics.jsonl as one PNG (matplotlib, Agg backend)."""

from pathlib import Path

from zeroseg.io import atomic_path
from zeroseg.trainer.losses import LOSS_TERMS
from zeroseg.trainer.metrics_log import read_metrics

PLOT_FILE = "curves.png"


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss terms, learning rate, throughput and data wait against the optimizer step; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    losses = axes[0, 0]
    for key in ("loss", *LOSS_TERMS):
        losses.plot(steps, [r[key] for r in records], label=key)
    losses.set_yscale("log")
    losses.set_title("loss terms")
    losses.legend()
    for axis, key, title in (
        (axes[0, 1], "lr", "learning rate"),
        (axes[1, 0], "images_per_s", "images / s (all processes)"),
        (axes[1, 1], "data_wait", "fraction of time waiting for data"),
    ):
        axis.plot(steps, [r[key] for r in records])
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
