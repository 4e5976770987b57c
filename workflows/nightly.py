"""The zeroseg nightly runner: cache new images, train on, evaluate the newest checkpoint, report.

    python workflows/nightly.py --config workflows/nightly.example.yaml

Steps, in order, each idempotent (a rerun after a crash at any point continues; a rerun with nothing
new does no work and says so):
1. lock: WORK_DIR/nightly.lock; a second instance prints "already running" and exits 0.
2. cache: `zs-cache build SOURCE --store STORE` for each source (incremental, resumable).
3. train: when the store holds images the run has not trained on yet (or there is no checkpoint),
   `zs-train run --stop-at` `train.steps_per_night` steps past the latest checkpoint, resuming the run.
   The run's own schedule (its config: epochs or steps, warm-up, cosine) stays fixed; nights only
   decide where each stretch stops, and a finished run stays finished. The target is recorded in
   WORK_DIR/state.json before training, so a crashed night resumes to the same target.
4. eval: `zs-eval` of the newest checkpoint on the configured datasets into
   WORK_DIR/evals/step-NNNNNNNN/, unless its results are there.
5. report: WORK_DIR/reports/DATE-step-NNNNNNNN.{png,md,json} (loss curves, a Markdown table with the
   change since the previous report, the same as JSON). The JSON is written last and marks the
   report as done.

Config (YAML): see workflows/nightly.example.yaml. Stage commands run in this Python's environment.
"""

import argparse
import datetime
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from zeroseg.io import write_atomically
from zeroseg.pipeline.store import FeatureStore
from zeroseg.trainer.checkpoint import checkpoint_step, latest_checkpoint


def load_config(path: str) -> dict:
    config = yaml.safe_load(Path(path).read_text())
    missing = [key for key in ("work_dir", "sources", "store", "train", "eval") if key not in config]
    if missing:
        sys.exit(f"error: {path}: missing key(s) {', '.join(missing)}")
    return config


def stage(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def run_step(name: str, command: list[str], durable: Callable[[], bool]) -> None:
    """Run one stage command; a failed one ends the night. `durable()` says whether the stage has committed
    something yet (what a crash mid-way would leave behind; tests/nightly_crash.py kills the stage then)."""
    returncode = run_forwarding_sigterm(name, command)
    if returncode:
        sys.exit(f"nightly: {name} failed (exit {returncode}): {' '.join(command)}")


def run_forwarding_sigterm(name: str, command: list[str]) -> int:
    """Run a stage command and return its exit code. A SIGTERM to the runner (a scheduler stopping the job) is
    passed on to the stage, which stops cleanly (zs-train checkpoints first); once it has exited, the runner
    exits 143 too, so no stage is left running beside the next night's."""
    child = subprocess.Popen(command)
    received: list[int] = []

    def forward(number: int, frame) -> None:
        received.append(number)
        child.send_signal(number)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        returncode = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:
        print(f"nightly: SIGTERM passed on to {name}, which exited {returncode}; the next run continues", flush=True)
        sys.exit(128 + signal.SIGTERM)
    return returncode


def ok_rows(store: str) -> int:
    if not FeatureStore.exists(store):
        return 0
    statuses = FeatureStore.open(store).manifest(columns=["status"]).column("status").to_pylist()
    return statuses.count("ok")


def cache(config: dict) -> int:
    store = config["store"]
    before = ok_rows(store)
    parts = Path(store) / "manifest"
    for source in config["sources"]:
        path, name = (source["path"], source.get("name")) if isinstance(source, dict) else (source, None)
        naming = ["--source-name", name] if name else []
        command = stage("zeroseg.pipeline.cli", "build", path, "--store", store, *naming, *config.get("cache_args", []))
        committed = len(list(parts.glob("shard-*.parquet")))
        run_step("cache", command, lambda committed=committed: len(list(parts.glob("shard-*.parquet"))) > committed)
    added = ok_rows(store) - before
    print(f"cache: {added} new images" if added else "cache: no new images", flush=True)
    return added


def train(config: dict, state: dict, save_state: Callable[[], None]) -> bool:
    run_dir = Path(config["train"]["run_dir"])
    latest = latest_checkpoint(run_dir)
    step, rows = checkpoint_step(latest), ok_rows(config["store"])
    if state.get("target_step") is not None and step >= state["target_step"]:  # trained, then crashed
        state.update(trained_rows=state["target_rows"], target_step=None, target_rows=None)
        save_state()
    pending = state.get("target_step") is not None
    if not pending and latest is not None and rows == state.get("trained_rows"):
        print(f"train: up to date at step {step} (no new images)", flush=True)
        return False
    if not pending:
        state.update(target_step=step + int(config["train"]["steps_per_night"]), target_rows=rows)
        save_state()
    target = state["target_step"]
    print(f"train: step {step} -> {target} on {rows} images", flush=True)
    args = ["run", "--store", config["store"], "--run-dir", run_dir, "--stop-at", target, "--no-progress"]
    args += ["--resume"] if latest is not None else list(config["train"].get("args", []))
    run_step("train", stage("zeroseg.trainer.cli", *args),
             lambda: checkpoint_step(latest_checkpoint(run_dir)) > step)
    state.update(trained_rows=state["target_rows"], target_step=None, target_rows=None)
    save_state()
    return True


def evaluate(config: dict, work_dir: Path) -> Path | None:
    checkpoint = latest_checkpoint(config["train"]["run_dir"])
    if checkpoint is None:
        print("eval: no checkpoint yet", flush=True)
        return None
    out = work_dir / "evals" / checkpoint.stem
    datasets = list(config["eval"]["datasets"])
    if all((out / f"{name}.json").is_file() for name in datasets):
        print(f"eval: {checkpoint.stem} already evaluated", flush=True)
        return out
    print(f"eval: {checkpoint.stem} on {', '.join(datasets)}", flush=True)
    args = [*datasets, "--checkpoint", checkpoint, "--data-root", config["eval"]["data_root"], "--out", out,
            "--no-progress", *config["eval"].get("args", [])]
    run_step("eval", stage("zeroseg.evaluation.cli", *args), lambda: False)
    return out


def report(config: dict, work_dir: Path, evals: Path | None, added: int) -> bool:
    if evals is None:
        return False
    reports = work_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    if list(reports.glob(f"*-{evals.name}.json")):
        print(f"report: up to date for {evals.name}", flush=True)
        return False
    stem = reports / f"{datetime.date.today().isoformat()}-{evals.name}"
    previous = sorted(reports.glob("*-step-*.json"), key=lambda p: p.stem.rsplit("-", 1)[1])
    last = json.loads(previous[-1].read_text()) if previous else None
    results = {
        name: json.loads((evals / f"{name}.json").read_text()) for name in config["eval"]["datasets"]
    }
    run_step("report", stage("zeroseg.trainer.cli", "plot", config["train"]["run_dir"], "--out", f"{stem}.png"),
             lambda: False)
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
    print(f"report: {stem}.md", flush=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="nightly YAML (see workflows/nightly.example.yaml)")
    config = load_config(parser.parse_args().config)
    work_dir = Path(config["work_dir"])
    work_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(work_dir / "nightly.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        print(f"nightly: already running (lock {work_dir / 'nightly.lock'} is held)")
        return
    try:
        state_path = work_dir / "state.json"
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        added = cache(config)
        trained = train(config, state, lambda: write_atomically(state_path, json.dumps(state, indent=1)))
        reported = report(config, work_dir, evaluate(config, work_dir), added)
        print("nightly: done" if added or trained or reported else "nightly: nothing new, no work done", flush=True)
    finally:
        lock.release()


if __name__ == "__main__":
    main()
