"""The zeroseg nightly runner: cache new images, train on, evaluate the newest checkpoint, report.

    python -m zeroseg nightly --config nightly.yaml     (python -m zeroseg jobs writes an example to start from)

Steps, in order, each idempotent (a rerun after a crash at any point continues; a rerun with nothing
new does no work and says so):
1. lock: WORK_DIR/nightly.lock, held by the runner and by the stage it runs (the stage inherits the lock's
   file descriptor), so a second instance, or a night started while a killed runner's stage still writes,
   prints "already running" and exits 0.
2. cache: `zs-cache build SOURCE --store STORE` for each source (incremental, resumable).
3. train: when the store holds images the run has not trained on yet (or there is no checkpoint),
   `zs-train run --stop-at` `train.steps_per_night` steps past the latest checkpoint, resuming the run.
   The run's own schedule (its config: epochs or steps, warm-up, cosine) stays fixed; nights only
   decide where each stretch stops, and a finished run stays finished. The target and the images it
   covers are recorded in WORK_DIR/state.json before training: a night after a crashed one trains to the
   same target when nothing was cached since, and steps_per_night past the latest checkpoint when new
   images came, so every night leaves the run trained on every image cached so far.
4. eval: `zs-eval` of the newest checkpoint on the configured datasets into
   WORK_DIR/evals/step-NNNNNNNN/, unless its results are there.
5. report: WORK_DIR/reports/DATE-step-NNNNNNNN.{png,md,json} (loss curves, a Markdown table with the
   change since the previous report, the same as JSON). The JSON is written last and marks the
   report as done.

Every night, however it ends, leaves WORK_DIR/nights/STARTED.md (STARTED: its start time), written at the
start and after each step: what ran, what failed (exit code, command, the last lines of its output) and the
command to see why. Each stage's output goes to WORK_DIR/nights/STARTED-STAGE.log; the runner's own lines
carry timestamps, under a header line per night. A killed night's record ends at its last step and says
"no end recorded". The last line printed gives the exit code: 0 done or nothing new, 1 failed, 128+N
stopped by signal N.

Stopping: SIGTERM or SIGINT (also to the runner as PID 1 in a container) passes SIGTERM to the running
stage, which stops cleanly (zs-train checkpoints first), and ends the night once it has exited; between
stages it ends the night at once. A runner killed outright (SIGKILL) stops its stage too: the stage gets
SIGTERM when its parent dies (Linux's parent-death signal).

Config (YAML): see nightly.example.yaml (`python -m zeroseg jobs OUT` writes it into OUT). Stage commands run in
this Python's environment.
"""

import argparse
import ctypes
import datetime
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import yaml

from zeroseg import __version__
from zeroseg.errors import UserError, first_line, require
from zeroseg.io import write_atomically
from zeroseg.pipeline.store import FeatureStore
from zeroseg.runtime import user_message
from zeroseg.trainer.checkpoint import checkpoint_step, latest_checkpoint

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies
TAIL_LINES = 20  # of a failed stage's output, in the night's record


def load_config(path: str) -> dict:
    """The nightly YAML; a config that cannot be read, or lacks a key, is a UserError."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read the nightly config {path}: {first_line(exc)}") from None
    require(isinstance(config, dict),
            f"{path}: not a nightly config (a YAML mapping of work_dir, store, sources, train, eval)")  # fmt: skip
    missing = [key for key in ("work_dir", "sources", "store", "train", "eval") if key not in config]
    require(not missing, f"{path}: missing key(s) {', '.join(missing)}")
    return config


class Arguments(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # a usage mistake is a UserError, as in every zeroseg command
        raise UserError(f"{message} (see python -m zeroseg nightly --help)")


def parse_arguments() -> tuple[str, dict]:
    """The config's path and content."""
    parser = Arguments(prog="python -m zeroseg nightly", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True,
                        help="nightly YAML (`python -m zeroseg jobs OUT` writes OUT/nightly.example.yaml)")
    parser.add_argument("--version", action="version", version=f"zeroseg {__version__}")
    config_path = parser.parse_args().config
    return config_path, load_config(config_path)


def stage(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def now() -> datetime.datetime:
    return datetime.datetime.now().astimezone()


def say(line: str) -> None:
    print(f"{now().isoformat(' ', 'seconds')} {line}", flush=True)


def stop_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn: the stage gets SIGTERM when the runner dies, however it dies (SIGKILL included)."""

    def arm() -> None:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the runner died before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


class Stopped(Exception):
    def __init__(self, number: int, log: Path | None = None):
        name = signal.Signals(number).name
        super().__init__(f"stopped by {name}")
        self.exit_code = 128 + number
        self.lines = [f"The night was stopped by {name} after the steps above; the next night continues from there."]
        self.lines += [f"The stopped stage's output: `less {log}`"] if log else []


class StageFailed(Exception):
    def __init__(self, name: str, command: list[str], returncode: int, log: Path):
        super().__init__(f"failed in {name}, which exited {returncode}")
        self.exit_code = 1
        tail = log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
        self.lines = [f"`{name}` exited {returncode}: `{shlex.join(command)}`", "", "The end of its output:", "",
                      "```", *tail, "```", "", f"To see why: `less {log}`"]


class Night:
    """One night's stages, the stop signals that reach them, and its record WORK_DIR/nights/STARTED.md."""

    def __init__(self, work_dir: Path, config_path: str, lock_fd: int):
        self.started = now()
        self.folder = work_dir / "nights"
        self.folder.mkdir(exist_ok=True)
        self.name = self.started.strftime("%Y-%m-%dT%H%M%S")
        self.config_path, self.lock_fd = config_path, lock_fd
        self.steps: list[str] = []  # what ran, one line per step
        self.outcome = "no end recorded (still running, or killed)"
        self.failure: list[str] = []  # what failed and how to see why (Markdown lines)
        self.running: subprocess.Popen | None = None
        self.stop_signal: int | None = None
        for number in STOP_SIGNALS:
            signal.signal(number, self.on_signal)

    @property
    def record(self) -> Path:
        return self.folder / f"{self.name}.md"

    def log_of(self, name: str) -> Path:
        return self.folder / f"{self.name}-{name}.log"

    def on_signal(self, number: int, frame) -> None:
        self.stop_signal = number
        if self.running is None or self.running.poll() is not None:
            raise Stopped(number)
        say(f"nightly: {signal.Signals(number).name}: passing SIGTERM on to the stage, then ending the night")
        self.running.send_signal(signal.SIGTERM)

    def step(self, line: str) -> None:
        self.steps.append(line)
        say(line)
        self.write()

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = self.log_of(name)
        say(f"{name}: {shlex.join(command)} > {log}")
        with log.open("ab") as output:
            return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, pass_fds=(self.lock_fd,),
                                    preexec_fn=stop_with_parent(os.getpid()))

    def run_stage(self, name: str, command: list[str], durable: Callable[[], bool]) -> None:
        """Run one stage; a failed or stopped one ends the night. `durable()` says whether the stage has committed
        something yet (what a crash mid-way would leave behind; tests/nightly_crash.py kills the stage then)."""
        self.running = self.start(name, command)
        returncode = self.running.wait()
        self.running = None
        if self.stop_signal:
            say(f"nightly: {name} exited {returncode}; the next night continues")
            raise Stopped(self.stop_signal, self.log_of(name))
        if returncode:
            raise StageFailed(name, command, returncode, self.log_of(name))

    def run(self, config: dict, state_path: Path) -> int:
        """The night's steps; returns the exit code."""
        self.write()
        try:
            state = json.loads(state_path.read_text()) if state_path.is_file() else {}
            added = cache(self, config)
            trained = train(self, config, state, lambda: write_atomically(state_path, json.dumps(state, indent=1)))
            reported = report(self, config, evaluate(self, config), added)
            outcome, code = ("done" if added or trained or reported else "nothing new, no work done"), 0
        except (StageFailed, Stopped) as ended:
            outcome, code, self.failure = str(ended), ended.exit_code, ended.lines
        except Exception as exc:  # the runner's own failure, e.g. a damaged store: recorded, then raised
            self.outcome = f"failed: {first_line(exc)} (exit 1)"
            self.failure = ["The runner failed:", "", "```", *traceback.format_exc().splitlines()[-TAIL_LINES:],
                            "```", "", "To see why: the runner's output (cron's log) from its header line "
                            f"`==== zeroseg nightly, pid {os.getpid()}`"]
            self.write()
            raise
        self.outcome = f"{outcome} (exit {code})"
        self.write()
        say(f"nightly: {self.outcome}; record {self.record}")
        return code

    def write(self) -> None:
        lines = [f"# zeroseg night {self.started.isoformat(' ', 'seconds')}: {self.outcome}", "",
                 f"Config `{self.config_path}`, written {now().isoformat(' ', 'seconds')}. Stage output: "
                 f"`{self.folder}/{self.name}-STAGE.log`.", "", "## What ran", "",
                 *(f"- {line}" for line in self.steps or ["nothing yet"])]
        if self.failure:
            lines += ["", "## What failed", "", *self.failure]
        write_atomically(self.record, "\n".join(lines) + "\n")


def ok_rows(store: str) -> int:
    if not FeatureStore.exists(store):
        return 0
    statuses = FeatureStore.open(store).manifest(columns=["status"]).column("status").to_pylist()
    return statuses.count("ok")


def cache(night: Night, config: dict) -> int:
    store = config["store"]
    before = ok_rows(store)
    parts = Path(store) / "manifest"
    for source in config["sources"]:
        path, name = (source["path"], source.get("name")) if isinstance(source, dict) else (source, None)
        naming = ["--source-name", name] if name else []
        command = stage("zeroseg.pipeline.cli", "build", path, "--store", store, *naming, *config.get("cache_args", []))
        committed = len(list(parts.glob("shard-*.parquet")))
        night.run_stage("cache", command,
                        lambda committed=committed: len(list(parts.glob("shard-*.parquet"))) > committed)
    added = ok_rows(store) - before
    night.step(f"cache: {added} new images" if added else "cache: no new images")
    return added


def train(night: Night, config: dict, state: dict, save_state: Callable[[], None]) -> bool:
    run_dir = Path(config["train"]["run_dir"])
    latest = latest_checkpoint(run_dir)
    step, rows = checkpoint_step(latest), ok_rows(config["store"])
    target = state.get("target_step")
    if target is not None and step >= target:  # trained, then crashed before saying so
        state.update(trained_rows=state["target_rows"], target_step=None, target_rows=None)
        target = None
    elif target is not None and rows != state["target_rows"]:  # a crashed night's stretch, and new images since
        target = None
    if target is None:
        if latest is not None and rows == state.get("trained_rows"):
            save_state()
            night.step(f"train: up to date at step {step} (no new images)")
            return False
        target = step + int(config["train"]["steps_per_night"])
        state.update(target_step=target, target_rows=rows)
    save_state()
    night.step(f"train: step {step} -> {target} on {rows} images")
    args = ["run", "--store", config["store"], "--run-dir", run_dir, "--stop-at", target, "--no-progress"]
    args += ["--resume"] if latest is not None else list(config["train"].get("args", []))
    night.run_stage("train", stage("zeroseg.trainer.cli", *args),
                    lambda: checkpoint_step(latest_checkpoint(run_dir)) > step)
    state.update(trained_rows=state["target_rows"], target_step=None, target_rows=None)
    save_state()
    return True


def evaluate(night: Night, config: dict) -> Path | None:
    checkpoint = latest_checkpoint(config["train"]["run_dir"])
    if checkpoint is None:
        night.step("eval: no checkpoint yet")
        return None
    out = night.folder.parent / "evals" / checkpoint.stem
    datasets = list(config["eval"]["datasets"])
    if all((out / f"{name}.json").is_file() for name in datasets):
        night.step(f"eval: {checkpoint.stem} already evaluated")
        return out
    args = [*datasets, "--checkpoint", checkpoint, "--data-root", config["eval"]["data_root"], "--out", out,
            "--no-progress", *config["eval"].get("args", [])]
    night.run_stage("eval", stage("zeroseg.evaluation.cli", *args), lambda: False)
    night.step(f"eval: {checkpoint.stem} on {', '.join(datasets)} into {out}")
    return out


def report(night: Night, config: dict, evals: Path | None, added: int) -> bool:
    if evals is None:
        return False
    reports = night.folder.parent / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    if list(reports.glob(f"*-{evals.name}.json")):
        night.step(f"report: up to date for {evals.name}")
        return False
    stem = reports / f"{datetime.date.today().isoformat()}-{evals.name}"
    previous = sorted(reports.glob("*-step-*.json"), key=lambda p: p.stem.rsplit("-", 1)[1])
    last = json.loads(previous[-1].read_text()) if previous else None
    results = {
        name: json.loads((evals / f"{name}.json").read_text()) for name in config["eval"]["datasets"]
    }
    night.run_stage("report", stage("zeroseg.trainer.cli", "plot", config["train"]["run_dir"], "--out",
                                    f"{stem}.png"), lambda: False)
    document = {
        "date": datetime.date.today().isoformat(),
        "checkpoint": evals.name,
        "store_images": ok_rows(config["store"]),
        "new_images": added,
        "datasets": {name: {"mIoU": r["mIoU"], "pixel_accuracy": r["pixel_accuracy"]} for name, r in results.items()},
        "previous": last and {"checkpoint": last["checkpoint"], "date": last["date"]},
    }
    write_atomically(Path(f"{stem}.md"), markdown(document, last))
    write_atomically(Path(f"{stem}.json"), json.dumps(document, indent=1) + "\n")
    night.step(f"report: {stem}.md")
    return True


def markdown(document: dict, last: dict | None) -> str:
    lines = [
        f"# zeroseg nightly report {document['date']}",
        "",
        f"Checkpoint `{document['checkpoint']}`, store of {document['store_images']} images "
        f"({document['new_images']} new tonight).",
        f"Previous report: {last['date']} `{last['checkpoint']}`." if last else "First report.",
        "",
        "| dataset | mIoU | change | pixel accuracy |",
        "|---|---|---|---|",
    ]
    for name, scores in document["datasets"].items():
        before = last and last["datasets"].get(name)
        change = f"{scores['mIoU'] - before['mIoU']:+.2f}" if before else "n/a"
        lines.append(f"| {name} | {scores['mIoU']:.2f} | {change} | {scores['pixel_accuracy']:.2f} |")
    lines += ["", f"![loss curves]({document['date']}-{document['checkpoint']}.png)", ""]
    return "\n".join(lines)


def exit_on_signal(number: int, frame) -> None:
    sys.exit(128 + number)


def main() -> None:
    """The runner; a usage mistake or a bad config is one line on stderr, exit 2."""
    for number in STOP_SIGNALS:  # until the night takes them over (Python as PID 1 would ignore them)
        signal.signal(number, exit_on_signal)
    try:
        config_path, config = parse_arguments()
    except UserError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        sys.exit(2)
    say(f"==== zeroseg nightly, pid {os.getpid()}, config {config_path} ====")
    work_dir = Path(config["work_dir"])
    work_dir.mkdir(parents=True, exist_ok=True)
    with (work_dir / "nightly.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"nightly: already running (lock {lock.name} is held by a runner or the stage it started), exit 0")
            return
        sys.exit(Night(work_dir, config_path, lock.fileno()).run(config, work_dir / "state.json"))


if __name__ == "__main__":
    main()
