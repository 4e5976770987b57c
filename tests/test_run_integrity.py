"""A run directory is trusted only when whole: checkpoint checksums with fallback on --resume, one trainer per run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from filelock import FileLock

from tests.conftest import REPO, TINY_RUN, invoke, killed_writer, make_store, train
from zeroseg.errors import UserError
from zeroseg.trainer import checkpoint as checkpoint_module
from zeroseg.trainer.checkpoint import FORMAT, list_checkpoints, payload_digest, read_checkpoint
from zeroseg.trainer.cli import main
from zeroseg.trainer.export import load_trained_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("runs"), count=4)


def two_checkpoints(store, run_dir):
    result = train(store, run_dir, "--steps", "3", "--set", "run.checkpoint_every=1", "--set", "run.keep_last=2")
    assert result.returncode == 0, result.stderr
    return list_checkpoints(run_dir)


def test_checkpoints_carry_a_checksum_of_their_contents(store, tmp_path):
    _, latest = two_checkpoints(store, tmp_path / "run")
    payload = torch.load(latest, map_location="cpu", weights_only=True)
    assert payload["checksum"] == payload_digest(payload) and len(payload["checksum"]) == 64
    name = next(iter(payload["model"]))
    payload["model"][name].view(-1)[0] += 1
    assert payload_digest(payload) != payload["checksum"]


def test_a_checkpoint_of_another_format_or_without_a_checksum_is_refused_in_one_line(store, tmp_path):
    """Nothing older than FORMAT was released: such a checkpoint is refused, not read in a compatibility path."""
    _, latest = two_checkpoints(store, tmp_path / "run")
    payload = torch.load(latest, map_location="cpu", weights_only=True)
    older = {**payload, "format": 1}
    torch.save({**older, "checksum": payload_digest(older)}, tmp_path / "older.pt")
    with pytest.raises(UserError, match=f"checkpoint '.*older.pt' is of format 1; this zeroseg reads format {FORMAT}$"):
        load_trained_model(tmp_path / "older.pt")
    shown = invoke(main, "export", tmp_path / "older.pt", "--out", tmp_path / "out")
    assert shown.returncode == 2 and shown.stderr == (
        f"error: checkpoint '{tmp_path / 'older.pt'}' is of format 1; this zeroseg reads format {FORMAT}\n"
    )
    torch.save({key: value for key, value in payload.items() if key != "checksum"}, tmp_path / "unsummed.pt")
    with pytest.raises(UserError, match="unsummed.pt' is damaged: its contents do not match its checksum$"):
        read_checkpoint(tmp_path / "unsummed.pt")


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_latest_checkpoint_is_one_line_and_resume_falls_back_to_the_previous(store, tmp_path, damage):
    previous, latest = two_checkpoints(store, tmp_path / "run")
    data = bytearray(latest.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # inside the largest tensor's bytes, which torch.load alone would read back changed
        payload = torch.load(latest, map_location="cpu", weights_only=True)
        tensor = max(payload["model"].values(), key=lambda t: t.numel())
        needle = tensor.reshape(-1)[: tensor.numel() // 2].numpy().tobytes()
        position = bytes(data).index(needle) + len(needle) // 2
        data[position] ^= 0x40
    latest.write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged|cannot be read"):
        read_checkpoint(latest)
    evaluated = invoke(main, "run", "--run-dir", tmp_path / "run", "--resume", "--steps", "4", "--no-progress")
    assert evaluated.returncode == 0, evaluated.stderr
    [reported] = [line for line in evaluated.stderr.splitlines() if "resuming from the previous" in line]
    assert reported.startswith(f"checkpoint '{latest}' ")
    assert reported.endswith(f"resuming from the previous checkpoint {previous.name} instead")
    assert "trained steps 2..4 of 4" in evaluated.stdout
    model, meta = load_trained_model(tmp_path / "run")
    assert meta["step"] == 4


def test_a_second_trainer_on_one_run_directory_is_refused_in_one_line(store, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "zeroseg.trainer.cli", "run", "--store", str(store), "--run-dir", str(run_dir),
               *TINY_RUN, "--steps", "5000", "--set", "run.checkpoint_every=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = run_dir / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and (not log.is_file() or not log.read_text()):
            time.sleep(0.05)
        second = train(store, run_dir, "--steps", "2")
        assert second.returncode == 2
        assert second.stderr.strip() == (
            f"error: run directory '{run_dir}' is in use by another zs-train: wait for it or choose another --run-dir"
        )
        resumed = invoke(main, "run", "--run-dir", run_dir, "--resume", "--no-progress")
        assert resumed.returncode == 2 and "is in use by another zs-train" in resumed.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143
    with FileLock(str(run_dir / ".lock"), timeout=0):  # released with the first trainer
        pass


def test_a_resume_removes_what_a_writer_killed_inside_torch_save_left_and_keeps_a_live_ones(store, tmp_path):
    run_dir = tmp_path / "run"
    two_checkpoints(store, run_dir)
    killed = killed_writer(run_dir / "checkpoints" / "step-00000004.pt")
    live = run_dir / "checkpoints" / f".step-00000009.pt.{os.getpid()}.partial"  # a writer still alive: this one
    live.write_bytes(b"being written")
    resumed = invoke(main, "run", "--run-dir", run_dir, "--resume", "--steps", "4", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert not killed.exists() and live.exists()
    assert [path.name for path in list_checkpoints(run_dir)] == ["step-00000003.pt", "step-00000004.pt"]


def test_a_run_folder_read_while_keep_last_prunes_gives_its_newest_checkpoint(store, tmp_path, monkeypatch):
    """The race of evaluating a run while it trains with run.keep_last=1: the listing still shows step 2, then the
    trainer renames step 3 in and prunes step 2 before the reader opens it (made deterministic by doing the
    trainer's two file changes right after the real listing)."""
    older, newest = two_checkpoints(store, tmp_path / "run")
    hidden = newest.rename(newest.with_name(f".{newest.name}.{os.getpid()}.partial"))  # not renamed in yet
    listing = checkpoint_module.list_checkpoints

    def listing_then_trainer_saves_and_prunes(run_dir):
        found = listing(run_dir)
        if hidden.exists():
            hidden.rename(newest)
            older.unlink()
        return found

    monkeypatch.setattr(checkpoint_module, "list_checkpoints", listing_then_trainer_saves_and_prunes)
    model, meta = load_trained_model(tmp_path / "run")
    assert meta["path"] == str(newest) and meta["step"] == 3
    with pytest.raises(UserError, match=f"^checkpoint '{older}' does not exist; a run keeps its last run.keep_last"):
        load_trained_model(older)  # named by hand, pruned since
