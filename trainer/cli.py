"""`zs-train`: stage two of zeroseg, training the ZeroSeg student on a feature store.

    zs-train run --store STORE --run-dir RUN [--config FILE] [--preset tiny|base] [--steps N | --epochs E]
                 [--set section.key=value ...] [--resume] [--stop-at N]
    torchrun --nproc_per_node 8 -m zeroseg.trainer.cli run ...      (one process per GPU; gloo on the CPU)
    zs-train config [--config FILE] [--set ...]              (print the effective configuration)
    zs-train plot RUN                                        (RUN/curves.png from RUN/metrics.jsonl)
    zs-train export RUN_OR_CKPT --out DIR                    (DIR/model.safetensors + DIR/config.json)
"""

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import typer

from zeroseg.errors import UserError, first_line, require
from zeroseg.runtime import DEVICE_HELP, run_cli

app = typer.Typer(
    help="Stage two of zeroseg: distill the CLIP teacher's cached grid features into the ZeroSeg student "
    "(masked ViT encoder, MAE decoder, grouping head). Configuration: a YAML/TOML file with sections model, "
    "loss, data, optim, schedule, run, overridden by --set section.key=value; see `zs-train config`.",
    pretty_exceptions_enable=False,
    add_completion=False,
)

CONFIG_OPTION = typer.Option(None, "--config", help="YAML (.yaml/.yml) or TOML (.toml) configuration file.")
SET_OPTION = typer.Option(
    [], "--set", help="Override one key, e.g. --set optim.lr=1e-3 --set model.mask_ratio=0.75 (repeatable; "
    "values are read as YAML).",
)
PRESET_OPTION = typer.Option(None, help="Model preset (model.preset): base = the paper's sizes, tiny = tests/demos.")


@dataclass(frozen=True)
class RunFlags:
    """The flags of `zs-train run`: config keys given as flags (None: not given) and the run's own, checked
    together when made."""

    store: str | None = None
    run_dir: str | None = None
    config: str | None = None
    preset: str | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    workers: int | None = None
    device: str | None = None
    resume: bool = False
    stop_at: int | None = None

    def __post_init__(self) -> None:
        require(self.steps is None or self.epochs is None, "give --steps or --epochs, not both")
        require(self.stop_at is None or self.stop_at >= 1, f"--stop-at must be >= 1, got {self.stop_at}")
        require(not self.resume or self.config is None,
                "--resume continues with the run directory's config.yaml; change keys with --set")
        require(not self.resume or self.run_dir is not None, "--resume needs --run-dir")

    def config_keys(self) -> dict[str, Any]:
        """{'section.key': value} of the flags given; --epochs also unsets a schedule.steps of the config."""
        given = {
            "data.store": self.store, "run.dir": self.run_dir, "model.preset": self.preset,
            "schedule.steps": self.steps, "schedule.epochs": self.epochs, "data.batch_size": self.batch_size,
            "data.workers": self.workers, "run.device": self.device,
        }  # fmt: skip
        keys = {key: value for key, value in given.items() if value is not None}
        return {**keys, "schedule.steps": None} if self.epochs is not None else keys


@app.command()
def run(
    store: str | None = typer.Option(None, "--store", help="Feature store directory made by zs-cache (data.store)."),
    run_dir: str | None = typer.Option(
        None, "--run-dir", help="Run directory for config.yaml, metrics.jsonl and checkpoints/ (run.dir)."
    ),
    config: str | None = CONFIG_OPTION,
    preset: str | None = PRESET_OPTION,
    steps: int | None = typer.Option(None, help="Total optimizer steps (schedule.steps); excludes --epochs."),
    epochs: float | None = typer.Option(None, help="Total passes over the store (schedule.epochs); excludes --steps."),
    batch_size: int | None = typer.Option(None, help="Images per process per pass (data.batch_size)."),
    workers: int | None = typer.Option(None, help="DataLoader worker processes per process (data.workers)."),
    device: str | None = typer.Option(None, help=f"{DEVICE_HELP} (run.device)"),
    overrides: list[str] = SET_OPTION,
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run directory's latest checkpoint with its config.yaml (plus --set)."
    ),
    stop_at: int | None = typer.Option(
        None, help="Stop once this many steps are done, with a checkpoint, as a preempted job; --resume continues."
    ),
    progress: bool = typer.Option(True, help="Show a progress bar (rank 0)."),
) -> None:
    """Train ZeroSeg on a feature store (single process, or one process per GPU under torchrun)."""
    from zeroseg import process_group
    from zeroseg.trainer.checkpoint import resume_config_file
    from zeroseg.trainer.config import build_config, read_config_file
    from zeroseg.trainer.train import TrainingDiverged, run_training

    flags = RunFlags(
        store=store, run_dir=run_dir, config=config, preset=preset, steps=steps, epochs=epochs,
        batch_size=batch_size, workers=workers, device=device, resume=resume, stop_at=stop_at,
    )  # fmt: skip
    config_file = resume_config_file(flags.run_dir) if flags.resume else flags.config
    cfg = build_config(read_config_file(config_file) if config_file else {}, overrides, flags.config_keys())
    log = (lambda line: typer.echo(line, err=True)) if process_group.env_rank() == 0 else (lambda line: None)
    try:
        result = run_training(cfg, resume=flags.resume, stop_at=flags.stop_at, log=log, progress=progress)
    except TrainingDiverged as exc:
        if process_group.env_rank() == 0:
            typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if process_group.env_rank() == 0:
        typer.echo(result.line())
    if result.stop_signal:
        raise typer.Exit(128 + result.stop_signal)


@app.command("config")
def show_config(
    config: str | None = CONFIG_OPTION,
    preset: str | None = PRESET_OPTION,
    overrides: list[str] = SET_OPTION,
) -> None:
    """Print the effective configuration (defaults < --config < --set) as YAML: every key zs-train run reads."""
    from zeroseg.trainer.config import build_config, config_yaml, read_config_file

    explicit = {"model.preset": preset} if preset is not None else {}
    cfg = build_config(read_config_file(config) if config else {}, overrides, explicit)
    typer.echo(config_yaml(cfg), nl=False)


@app.command()
def plot(
    run_dir: str = typer.Argument(..., help="Run directory holding metrics.jsonl."),
    out: str | None = typer.Option(None, help="PNG to write (default RUN_DIR/curves.png)."),
) -> None:
    """Plot a run's loss terms, learning rate, throughput and data wait into a PNG."""
    from zeroseg.trainer.metrics_log import plot_metrics

    typer.echo(f"wrote {plot_metrics(run_dir, out)}")


@app.command("export")
def export(
    source: str = typer.Argument(..., help="Checkpoint (.pt) or run folder (its latest checkpoint)."),
    out: str = typer.Option(..., "--out", help="Folder to write model.safetensors, config.json and README.md to."),
    push_to_hub: str | None = typer.Option(
        None, "--push-to-hub", metavar="ORG/REPO",
        help="Then upload the folder to this Hugging Face Hub model repo (made if missing; your HF token).",
    ),
) -> None:
    """Export the trained model: DIR/model.safetensors (weights), DIR/config.json (model config, teacher,
    preprocessing, timm's fields; no absolute paths) and DIR/README.md (model card). zs-eval/zs-segment
    --checkpoint DIR (or hf-hub:ORG/REPO once pushed) and Segmenter.from_pretrained load it."""
    from zeroseg.trainer.export import export_model

    folder = export_model(source, out)
    typer.echo(f"exported {source} to {folder}")
    if push_to_hub is not None:
        from huggingface_hub import HfApi

        api = HfApi()
        try:
            api.create_repo(push_to_hub, exist_ok=True)
            commit = api.upload_folder(folder_path=str(folder), repo_id=push_to_hub,
                                       commit_message=f"zeroseg export of {Path(source).name}")  # fmt: skip
        except (OSError, ValueError) as exc:  # offline, no token, no network, a malformed repo id
            raise UserError(f"--push-to-hub {push_to_hub}: {first_line(exc)} (the export is in {folder})") from None
        typer.echo(f"pushed {folder} to {commit.commit_url}")


def main() -> None:
    os.environ.setdefault("TQDM_MININTERVAL", "0.5")
    run_cli(partial(app, prog_name="zs-train"))


if __name__ == "__main__":
    main()
