"""zs-train end to end on a tiny store of the real fixture photos: learning, exact resume, DDP, failures."""

import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import PHOTOS, REPO, TINY_RUN, invoke, make_store, train
from zeroseg.pipeline.store import FeatureStore
from zeroseg.trainer.checkpoint import list_checkpoints
from zeroseg.trainer.cli import main
from zeroseg.trainer.config import build_config
from zeroseg.trainer.export import load_trained_model
from zeroseg.trainer.metrics_log import METRIC_KEYS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def finished_run(store, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = train(store, run_dir, "--steps", "4", "--set", "run.checkpoint_every=1", "--set", "run.keep_last=2")
    assert result.returncode == 0, result.stderr
    return run_dir


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_overfits_eight_images(tmp_path):
    store = make_store(tmp_path, count=8)
    result = train(
        store, tmp_path / "run", "--steps", "80", "--batch-size", "8", "--workers", "1",
        "--set", "optim.lr=2e-3", "--set", "schedule.warmup_steps=10",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = metrics(tmp_path / "run")
    assert len(lines) == 80 and lines[0]["epoch"] == 1.0
    for term in ("loss", "match"):
        last = sum(line[term] for line in lines[-10:]) / 10
        assert last < 0.5 * lines[0][term], (term, lines[0][term], last)


def test_resume_continues_exactly(store, tmp_path):
    straight = train(store, tmp_path / "straight", "--steps", "6")
    assert straight.returncode == 0, straight.stderr
    first = train(store, tmp_path / "resumed", "--steps", "6", "--stop-at", "3")
    assert first.returncode == 0, first.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-00000003.pt"]
    second = invoke(main, "run", "--run-dir", tmp_path / "resumed", "--resume", "--workers", "1", "--no-progress")
    assert second.returncode == 0, second.stderr
    assert "trained steps 3..6 of 6" in second.stdout
    a = weights(tmp_path / "straight/checkpoints/step-00000006.pt")
    b = weights(tmp_path / "resumed/checkpoints/step-00000006.pt")
    assert all(torch.equal(a[name], b[name]) for name in a)
    timing = {"images_per_s", "data_wait", "elapsed_s"}
    strip = [{k: v for k, v in line.items() if k not in timing} for line in metrics(tmp_path / "straight")]
    assert strip == [{k: v for k, v in line.items() if k not in timing} for line in metrics(tmp_path / "resumed")]


def test_a_resume_with_another_loader_worker_count_says_its_batches_are_laid_out_anew(store, tmp_path):
    """The read order follows data.workers (trainer.sampling): a resume with another count goes on to the end and
    says it is a continuation, not an exact replay."""
    first = train(store, tmp_path / "run", "--steps", "4", "--stop-at", "2")
    assert first.returncode == 0, first.stderr
    second = invoke(main, "run", "--run-dir", tmp_path / "run", "--resume", "--workers", "2", "--no-progress")
    assert second.returncode == 0, second.stderr
    said = second.stdout + second.stderr
    assert "data.workers was 0, now 2: the batches are laid out for the new number of loader workers" in said
    assert "trained steps 2..4 of 4" in second.stdout
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "step-00000004.pt"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_equal_one_process(store, tmp_path):
    steps = ("--steps", "3", "--batch-size", "2")
    one = train(store, tmp_path / "one", *steps, "--set", "optim.accum_steps=2")
    assert one.returncode == 0, one.stderr
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "zeroseg.trainer.cli", "run", "--store", str(store), "--run-dir", str(tmp_path / "two"), *TINY_RUN,
        *steps, "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    two = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "effective batch 4 (2 x 1 passes x 2 processes)" in two.stderr
    a = weights(tmp_path / "one/checkpoints/step-00000003.pt")
    b = weights(tmp_path / "two/checkpoints/step-00000003.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)
    assert [line["loss"] for line in metrics(tmp_path / "one")] == pytest.approx(
        [line["loss"] for line in metrics(tmp_path / "two")], abs=1e-5
    )


def _one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in line, line


def test_bad_arguments_are_one_line_errors(store, finished_run, tmp_path):
    _one_line_error(
        train(store, tmp_path / "r", "--steps", "2", "--set", "model.teacher_dim=16"),
        "holds 32-dim features", "teacher_dim is 16",
    )
    _one_line_error(train(tmp_path / "missing", tmp_path / "r", "--steps", "2"), "is not a feature store")
    _one_line_error(train(store, tmp_path / "r", "--set", "optim.lrr=1"), "unknown config key 'optim.lrr'")
    _one_line_error(train(store, tmp_path / "r", "--steps", "2", "--epochs", "1"), "--steps or --epochs")
    _one_line_error(train(store, tmp_path / "r", "--stop-at", "0"), "--stop-at must be >= 1, got 0")
    _one_line_error(invoke(main, "run", "--resume"), "--resume needs --run-dir")
    _one_line_error(invoke(main, "run", "--run-dir", finished_run, "--resume", "--config", "a.yaml"),
                    "--resume continues with the run directory's config.yaml")
    _one_line_error(train(store, tmp_path / "r", "--steps", "2", "--resume"), "nothing to resume")
    _one_line_error(train(store, finished_run, "--steps", "2"), "already holds checkpoints", "--resume")
    _one_line_error(
        invoke(main, "run", "--run-dir", finished_run, "--resume", "--set", "model.mask_ratio=0.5"),
        "was trained with model.mask_ratio=0.6",
    )
    assert not (tmp_path / "r").exists()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(store, tmp_path):
    result = train(
        store, tmp_path / "run", "--steps", "8", "--set", "optim.lr=1e30", "--set", "schedule.warmup_steps=4",
        "--set", "run.checkpoint_every=1",
    )  # fmt: skip
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss or gradient in step "), result.stderr
    last = list_checkpoints(tmp_path / "run")[-1]
    assert line.endswith(f"the last checkpoint is {last}")
    model, meta = load_trained_model(tmp_path / "run", "cpu")
    assert f"after {meta['step']} good steps" in line and meta["step"] < 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_run_directory_metrics_plot_and_model_for_evaluation(store, finished_run):
    assert [p.name for p in list_checkpoints(finished_run)] == ["step-00000003.pt", "step-00000004.pt"]
    lines = metrics(finished_run)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all(tuple(line) == METRIC_KEYS and all(math.isfinite(v) for v in line.values()) for line in lines)
    assert lines[0]["lr"] == 0.0 and lines[1]["lr"] == pytest.approx(1e-3)
    saved = build_config(yaml.safe_load((finished_run / "config.yaml").read_text()), [])
    assert (saved.preset, saved.schedule.steps, saved.data.store) == ("tiny", 4, str(store))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finished_run / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert {"train/recon", "train/distill", "train/match", "train/lr"} <= set(events.Tags()["scalars"])

    plotted = invoke(main, "plot", finished_run)
    assert plotted.returncode == 0, plotted.stderr
    assert (finished_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model, meta = load_trained_model(finished_run, "cpu")
    assert not model.training and meta["step"] == 4 and meta["model_config"]["embed_dim"] == 32
    assert meta["store"]["rows"] == 10 and meta["store"]["teacher"]["model"] == "zs-tiny-clip"
    assert meta["loss_config"]["l1_reduction"] == "mean" and meta["effective_batch"] == 2
    with torch.no_grad():
        output = model(torch.randn(1, 3, 32, 32))
    assert output.g.shape == (1, 4, 32) and output.pred is None


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_checkpoint_after_the_current_step_and_resume_continues(store, tmp_path, stop):
    """A scheduler's SIGTERM or a terminal's Ctrl-C (SIGINT) to the whole process group (loader worker included): a
    checkpoint at the step reached, exit 128 + the signal, and --resume goes on from there."""
    command = [sys.executable, "-m", "zeroseg.trainer.cli", "run", "--store", str(store),
               "--run-dir", str(tmp_path / "run"), *TINY_RUN, "--steps", "5000", "--workers", "1",
               "--set", "run.checkpoint_every=100000", "--set", "run.log_every=7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's job
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.is_file() or not log.read_text()):
        time.sleep(0.05)
    os.killpg(process.pid, stop)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + stop, err[-2000:]
    [checkpoint] = list_checkpoints(tmp_path / "run")
    step = int(checkpoint.stem.split("-")[1])
    assert 7 <= step < 5000
    stopped = f"stopped by {stop.name} after step {step} of 5000; checkpoint {checkpoint}; --resume continues"
    assert out.strip() == stopped
    assert metrics(tmp_path / "run")[-1]["step"] == step  # the steps since the last line are logged too
    resumed = invoke(main, "run", "--run-dir", tmp_path / "run", "--resume", "--steps", str(step + 2), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert list_checkpoints(tmp_path / "run")[-1].name == f"step-{step + 2:08d}.pt"


def test_ablations_that_leave_parts_untrained_run_under_ddp(store, tmp_path):
    """Table 3/4's 1x1-only distillation (no matching loss) and Table 5's 0% masking (no decoder) leave
    parameters without gradient; two gloo processes must still train them."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "zeroseg.trainer.cli", "run", "--store", str(store), "--run-dir", str(tmp_path / "run"), *TINY_RUN,
        "--steps", "3", "--set", "loss.grids=[1]", "--set", "model.mask_ratio=0.0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line["match"] for line in metrics(tmp_path / "run")] == [0.0, 0.0, 0.0]
    assert [line["recon"] for line in metrics(tmp_path / "run")] == [0.0, 0.0, 0.0]


def test_images_that_moved_vanished_or_changed_since_caching_are_one_line_errors(tmp_path):
    store = make_store(tmp_path, count=4)
    photos = tmp_path / "photos"
    run = ("--steps", "2", "--workers", "1")

    def refused(result, message):  # the run's start line may come first; the error is the last line
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), result.stderr

    first = sorted(photos.iterdir())[0]
    first.write_bytes(PHOTOS[5].read_bytes())  # same name, other pixels: its features describe the old ones
    changed = train(store, tmp_path / "r1", *run)
    refused(changed, f"image '{first.name}' of source 'photos' changed since it was cached")

    first.unlink()
    vanished = train(store, tmp_path / "r2", *run)
    refused(vanished, f"cannot read image '{first.name}' of source 'photos'")

    photos.rename(tmp_path / "elsewhere")
    moved = train(store, tmp_path / "r3", *run)
    refused(moved, f"image source '{photos}' recorded in the store is not reachable")


def test_resume_after_a_kill_mid_metrics_line(store, tmp_path):
    assert train(store, tmp_path / "run", "--steps", "2").returncode == 0
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "epoch": 0.6, "lr": 0.00')  # the torn line of a run killed while logging
    resumed = invoke(main, "run", "--run-dir", tmp_path / "run", "--resume", "--steps", "3", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert [line["step"] for line in metrics(tmp_path / "run")] == [1, 2, 3]


def test_tensorboard_after_a_crash_and_resume_has_one_point_per_step(store, tmp_path):
    assert train(store, tmp_path / "run", "--steps", "4", "--set", "run.checkpoint_every=2").returncode == 0
    (tmp_path / "run" / "checkpoints" / "step-00000004.pt").unlink()  # crashed after logging 3, 4: resume from 2
    resumed = invoke(main, "run", "--run-dir", tmp_path / "run", "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_resume_refuses_a_store_whose_teacher_changed(store, tmp_path):
    """The checkpoint records the store's teacher as the store's attribute holds it; a resume compares the two."""
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    assert train(copy, tmp_path / "run", "--steps", "2", "--stop-at", "1").returncode == 0
    changed = FeatureStore.open(copy, writable=True)  # as a store rebuilt with another teacher records it
    changed.meta.teacher = dataclasses.replace(changed.meta.teacher, quick_gelu=True)
    changed.save_meta()
    resumed = invoke(main, "run", "--run-dir", tmp_path / "run", "--resume", "--no-progress")
    assert resumed.returncode == 2 and len(resumed.stderr.strip().splitlines()) == 1
    assert "step-00000001.pt was trained on 10 images of a store with teacher zs-tiny-clip;" in resumed.stderr
    assert "resume on the same store, or start a new run" in resumed.stderr


def test_a_non_finite_step_is_never_applied_and_the_run_stops_at_the_next_read(store, tmp_path):
    """A gradient made NaN in step 6 (0-based 5) of 8, the loss read every 4 steps: the fused AdamW skips step 6
    and every later one on the device, the run stops after step 8 without writing its checkpoint, and the
    model and optimizer are those of 5 good steps."""
    from zeroseg import process_group
    from zeroseg.pipeline.store_reader import StoreReader
    from zeroseg.trainer.train import Trainer, TrainingDiverged

    straight = train(store, tmp_path / "straight", "--steps", "8", "--stop-at", "5")
    assert straight.returncode == 0, straight.stderr
    cfg = build_config({}, ["optim.lr=1e-3", "schedule.warmup_steps=1", "run.log_every=4", "run.checkpoint_every=4"], {
        "model.preset": "tiny", "run.device": "cpu", "data.batch_size": 2, "data.workers": 0, "data.store": str(store),
        "run.dir": str(tmp_path / "run"), "schedule.steps": 8,
    })  # fmt: skip
    process = process_group.setup("cpu")
    trainer = Trainer(cfg, process, StoreReader.open(store), None)
    backward = iter(range(100))
    nan_in_step_6 = lambda grad: grad * math.nan if next(backward) == 5 else grad  # noqa: E731
    trainer.model.decoder_pred.weight.register_hook(nan_in_step_6)
    try:
        with pytest.raises(TrainingDiverged) as diverged:
            trainer.run(None, lambda line: None, progress=False)
        assert str(diverged.value).startswith("non-finite loss or gradient in step 6, found after step 8 ")
        assert "after 5 good steps; the last checkpoint is " in str(diverged.value)
        assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000004.pt"]
        good = torch.load(tmp_path / "straight/checkpoints/step-00000005.pt", weights_only=True)
        assert all(torch.equal(value, good["model"][name]) for name, value in trainer.model.state_dict().items())
        adam = trainer.optimizer.state_dict()["state"]
        for index, state in good["optimizer"]["state"].items():
            assert all(torch.equal(adam[index][key], value) for key, value in state.items())
    finally:
        trainer.release()
        process_group.shutdown(process)


def test_the_training_step_reads_the_device_only_every_log_every_steps(store, tmp_path, monkeypatch):
    """Host reads of tensors (what waits for a GPU) made by the code that runs on the device, counted over 8 steps
    read every 4: the loss sums and the non-finite check are read together, twice."""
    device_code = {"train.py", "model.py", "losses.py", "grouping.py", "vit.py", "masking.py"}
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "trainer" in caller and Path(caller).name in device_code:
                reads.append(f"{Path(caller).name}:{sys._getframe(1).f_lineno} {_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    every_4 = ("--set", "run.log_every=4", "--set", "run.checkpoint_every=8")
    result = train(store, tmp_path / "run", "--steps", "8", *every_4)
    assert result.returncode == 0, result.stderr
    assert len(reads) == 2 and len(set(reads)) == 1, reads  # before: 2 per step (the terms' tolist, float(grad_norm))


def test_the_models_buffers_are_constant_so_ddp_need_not_broadcast_them():
    """Trainer's DDP runs with broadcast_buffers=False: the student's buffers (its fixed sin-cos positions) are the
    same after a training step, and on every process, as they are made from the config alone."""
    from zeroseg.trainer.model import ZeroSeg
    from zeroseg.trainer.model_config import model_preset

    torch.manual_seed(0)
    model = ZeroSeg(model_preset("tiny"))
    torch.manual_seed(1)
    other = ZeroSeg(model_preset("tiny"))
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    assert before and all(torch.equal(buffer, dict(other.named_buffers())[name]) for name, buffer in before.items())
    output = model(torch.randn(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    values = [value for value in vars(output).values() if isinstance(value, torch.Tensor) and value.requires_grad]
    sum(value.float().sum() for value in values).backward()
    torch.optim.AdamW(model.parameters(), lr=1.0).step()
    assert all(torch.equal(buffer, before[name]) for name, buffer in model.named_buffers())



def test_run_compile_makes_the_step_call_the_compiled_student_and_checkpoints_keep_plain_names(store, tmp_path):
    """run.compile wraps what the step calls in torch.compile (compiling it on the CPU takes minutes on this
    machine, so no step runs here); the checkpointed module is the plain one."""
    from zeroseg import process_group
    from zeroseg.pipeline.store_reader import StoreReader
    from zeroseg.trainer.train import Trainer

    cfg = build_config({}, ["run.compile=true"], {
        "model.preset": "tiny", "run.device": "cpu", "data.batch_size": 2, "data.store": str(store),
        "run.dir": str(tmp_path / "run"), "schedule.steps": 2, "schedule.warmup_steps": 1,
    })  # fmt: skip
    process = process_group.setup("cpu")
    trainer = Trainer(cfg, process, StoreReader.open(store), None)
    try:
        assert isinstance(trainer.student, torch._dynamo.eval_frame.OptimizedModule)
        assert trainer.student._orig_mod is trainer.ddp is trainer.model
        assert not any(name.startswith("_orig_mod") for name in trainer.model.state_dict())
    finally:
        trainer.release()
        process_group.shutdown(process)
