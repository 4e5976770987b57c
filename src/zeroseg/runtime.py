"""Run-time helpers every stage shares: the device a process computes on, how a command turns a UserError
into one line and an exit code, and an ordered thread-pool map."""

import errno
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import typer

from zeroseg.errors import UserError, first_line

if TYPE_CHECKING:
    import torch

# Variables of a job spec (Slurm, PBS) that say the job was given GPUs: --device auto warns without one.
GPU_JOB_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS", "SLURM_GPUS_PER_NODE",
                     "SLURM_GPUS_PER_TASK", "SLURM_TRES_PER_TASK", "PBS_NGPUS")


DEVICE_HELP = (
    "auto (cuda:LOCAL_RANK when a GPU is visible, else cpu; warns when the job asked for GPUs but none is there), "
    "cpu, cuda (= cuda:LOCAL_RANK; an error without a GPU) or cuda:K."
)


def bar_disabled(wanted: bool) -> bool | None:
    """tqdm's `disable` for a progress bar: off when not wanted (--no-progress), and None (tqdm: off unless its
    stream, stderr, is a terminal) when wanted, so logs and pipes get no bar lines."""
    return None if wanted else True


def gpu_job_request() -> str | None:
    """The job-spec variable (e.g. SLURM_GPUS_ON_NODE=4) saying this process was given GPUs, if any."""
    for name in GPU_JOB_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value not in ("0", "(null)") and (name != "SLURM_TRES_PER_TASK" or "gpu" in value):
            return f"{name}={value}"
    return None


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> "torch.device":
    """The device a process computes on, checked to exist.

    auto: cuda:LOCAL_RANK when a GPU is visible, else cpu, with a loud warning on stderr when the job
    asked for GPUs (see GPU_JOB_VARIABLES); cuda: cuda:LOCAL_RANK; cuda:K: that GPU (a single process
    only: under torchrun every rank takes its own); cpu. cuda without a visible GPU is an error. (torch is
    imported here, so that a command's --help stays fast.)
    """
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        request = gpu_job_request() if name == "cpu" else None
        if request:
            build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA GPU visible"
            print(
                f"WARNING: --device auto runs on the CPU ({build}) although the job asked for GPUs ({request}): "
                "this is ~100x slower; check CUDA_VISIBLE_DEVICES and the driver, or pass --device cpu",
                file=sys.stderr,
            )
    if name == "cpu":
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:K)") from None
    if device.type != "cuda":
        raise UserError(f"unsupported device '{name}' (use auto, cpu, cuda or cuda:K)")
    if not torch.cuda.is_available():
        build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
        raise UserError(f"device '{name}' asked for, but no CUDA GPU is visible{build}: use --device cpu or auto")
    if device.index is not None and world_size > 1:
        raise UserError(f"device '{name}' names one GPU; under torchrun use cuda or auto (one GPU per rank)")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise UserError(f"GPU {index} does not exist: {torch.cuda.device_count()} visible")
    return torch.device("cuda", index)


def prefetch_map(fn: Callable, items: Iterable, workers: int, ahead: int) -> Iterator:
    """fn over items in a thread pool, results in input order, at most `ahead` in flight."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        iterator = iter(items)
        in_flight: deque[Future] = deque(pool.submit(fn, item) for _, item in zip(range(ahead), iterator))
        while in_flight:
            result = in_flight.popleft().result()
            for item in iterator:
                in_flight.append(pool.submit(fn, item))
                break
            yield result


def user_message(exc: UserError) -> str:
    """One line: the reason's first line; for an error raised in a DataLoader worker (which torch re-raises
    with the worker's traceback) the original message, the traceback's last line."""
    lines = str(exc).strip().splitlines()
    if lines and lines[0].startswith("Caught UserError in DataLoader worker"):
        return lines[-1].removeprefix(f"{UserError.__module__}.{UserError.__qualname__}: ")
    return first_line(exc) or type(exc).__name__


INTERRUPTED = 130
# Failures of the place a command writes to, not of the program: one line, exit 1.
ENVIRONMENT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def usage_line(exc: Exception) -> str:
    """One line for a click/typer usage mistake: the command, the reason and where help is."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else ""
    reason = " ".join(exc.format_message().split())
    subcommands = sorted(getattr(ctx.command, "commands", None) or {}) if ctx is not None else []
    if subcommands and reason.startswith("Missing command"):
        reason = f"give a command ({', '.join(subcommands)})"
    hint = f" (see '{command} --help')" if command else ""
    return f"error: {command + ': ' if command else ''}{reason}{hint}"


def run_cli(typer_app: typer.Typer) -> None:
    """Run a Typer app: UserError and every command-line usage mistake become one line on stderr and exit code 2;
    other click errors print their message with their own exit code; `--version` as the only argument prints the
    command's name and zeroseg's version. typer 0.29 raises the exceptions of the click it bundles (typer._click),
    not the installed click's."""
    from typer._click.exceptions import ClickException

    if sys.argv[1:] == ["--version"]:
        from zeroseg import __version__

        typer.echo(f"{getattr(typer_app, 'keywords', {}).get('prog_name', 'zeroseg')} {__version__}")
        sys.exit(0)
    try:
        result = typer_app(standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {user_message(exc)}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(INTERRUPTED)
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRORS:
            raise
        reason = "no space left on device" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
        typer.echo(f"error: {reason}" + (f": {exc.filename}" if exc.filename else ""), err=True)
        sys.exit(1)
    except ClickException as exc:
        if getattr(exc, "exit_code", 1) == 2:
            typer.echo(usage_line(exc), err=True)
            sys.exit(2)
        typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    if result == INTERRUPTED:  # typer returns Ctrl-C (KeyboardInterrupt) as exit code 130
        typer.echo("interrupted", err=True)
    sys.exit(result if isinstance(result, int) else 0)
