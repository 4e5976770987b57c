"""The training loop of `zs-train run`: ZeroSeg distilled from a feature store, in one process or under torchrun.

One optimizer step, in each process:
  for each of the accum_steps device batches (trainer.sampling decides which samples):
      uint8 crops on the device (trainer.data.DeviceBatches: moved, or decoded for a decode "device" store, while
      the step before ran) -> ModelInput -> ZeroSeg under bf16
      autocast (CUDA) -> total_loss / accum_steps
      -> backward (DDP averages the gradients over processes on the last pass only)
  the loss terms are averaged over processes; the gradient is clipped (optional), the lr of the step is set and
  AdamW steps, unless this or an earlier step had a non-finite loss or gradient norm: that is found on the
  device (no host wait) and gates the fused AdamW (its found_inf, as a GradScaler does), so such a step and
  every step after it leave the model and the optimizer as they were. The host reads the device (the loss
  sums and the first non-finite step, one transfer) every run.log_every steps and before every checkpoint,
  and stops there (TrainingDiverged) when a step was non-finite, so the checkpoints on disk are all good.
  Under torchrun the processes agree on a scheduler's stop signal every STOP_EVERY steps (one all-reduce).

The masking and Gumbel noise come from one generator reseeded before every device batch from
(seed, step, index of the device batch in its step), so the noise a sample gets does not depend on the
number of processes, and resuming at a step restores it exactly.
"""

import gc
import os
import signal
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from zeroseg import process_group
from zeroseg.errors import UserError
from zeroseg.io import remove_dead_partials, write_atomically
from zeroseg.pipeline.store_reader import StoreReader, check_decode_device
from zeroseg.process_group import StopRequest
from zeroseg.runtime import bar_disabled
from zeroseg.trainer.checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    check_effective_batch,
    latest_checkpoint,
    restore_rng,
    resume_payload,
    save_checkpoint,
)
from zeroseg.trainer.config import TrainConfig, config_yaml
from zeroseg.trainer.data import DeviceBatches, ModelInput, StoreBatches, check_store, make_loader
from zeroseg.trainer.losses import LOSS_TERMS, total_loss
from zeroseg.trainer.metrics_log import MetricsLog
from zeroseg.trainer.model import ZeroSeg
from zeroseg.trainer.optim import make_optimizer, make_schedule
from zeroseg.trainer.sampling import BatchPlan

STEP_VALUES = ("total", *LOSS_TERMS)  # what each step averages over its passes and the processes
STOP_EVERY = 5  # steps between two checks that every process agrees on a stop signal (under torchrun)
LOCK_FILE = ".lock"


class TrainingDiverged(Exception):
    """A non-finite loss or gradient: the run stopped before applying that step."""


@dataclass
class TrainResult:
    run_dir: Path
    first_step: int  # the step this invocation started from
    step: int  # steps done when it stopped
    total_steps: int
    checkpoint: Path | None  # the last checkpoint written
    seconds: float
    stop_signal: int | None = None  # the signal a scheduler stopped the run early with (any rank's)

    def line(self) -> str:
        if self.stop_signal:
            return (
                f"stopped by {signal.Signals(self.stop_signal).name} after step {self.step} of "
                f"{self.total_steps}; checkpoint {self.checkpoint}; --resume continues"
            )
        if self.step == self.first_step:
            return f"nothing to do: {self.run_dir} is at step {self.step} of {self.total_steps}"
        rate = (self.step - self.first_step) / self.seconds if self.seconds else 0.0
        return (
            f"trained steps {self.first_step}..{self.step} of {self.total_steps} in {self.seconds:.1f} s "
            f"({rate:.2f} steps/s); checkpoint {self.checkpoint}"
        )


def noise_seed(seed: int, step: int, index: int) -> int:
    """Seed of the masking/Gumbel generator for device batch `index` of optimizer step `step`."""
    return int(np.random.SeedSequence((seed, step, index)).generate_state(1, np.uint64)[0])


def run_training(
    cfg: TrainConfig,
    resume: bool = False,
    stop_at: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> TrainResult:
    """Train as `cfg` says; resume: continue from the run directory's latest checkpoint; stop_at: stop (with a
    checkpoint) once this many steps are done, as a preempted job would; progress: a tqdm bar on rank 0.
    Raises UserError (bad configuration or store) and TrainingDiverged."""
    if not cfg.data.store:
        raise UserError("no feature store given: pass --store or set data.store")
    if not cfg.run.dir:
        raise UserError("no run directory given: pass --run-dir or set run.dir")
    with run_dir_lock(cfg.run.dir):
        return _train_locked(cfg, resume, stop_at, log, progress)


@contextmanager
def run_dir_lock(run_dir: str | Path):
    """One trainer per run directory: the first process (rank 0, or the only one) holds an OS file lock on
    RUN_DIR/.lock for the whole run (released by the kernel if it dies); a second is refused in one line. The
    holder deletes the temporary files a killed trainer left (zeroseg.io.remove_dead_partials)."""
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory '{run_dir}' is a file: choose another --run-dir")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(run_dir / LOCK_FILE), timeout=0)
        lock.acquire()
    except Timeout:
        raise UserError(
            f"run directory '{run_dir}' is in use by another zs-train: wait for it or choose another --run-dir"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot write run directory '{run_dir}': {exc.strerror or exc}") from None
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):  # what a killed trainer was writing (kill -9 in torch.save)
        remove_dead_partials(folder)
    try:
        yield
    finally:
        lock.release()
        if created and [entry.name for entry in run_dir.iterdir()] == [LOCK_FILE]:  # refused before any output
            (run_dir / LOCK_FILE).unlink()
            run_dir.rmdir()


def _train_locked(
    cfg: TrainConfig, resume: bool, stop_at: int | None, log: Callable[[str], None], progress: bool
) -> TrainResult:
    samples = StoreReader.open(cfg.data.store)
    check_store(samples, cfg.model, cfg.loss, cfg.data.resize)
    payload = resume_payload(cfg, samples.identity(), resume, log)
    trained_workers = payload["config"]["data"]["workers"] if payload is not None else cfg.data.workers
    if max(1, trained_workers) != max(1, cfg.data.workers):  # trainer.sampling: the read streams
        log(f"data.workers was {trained_workers}, now {cfg.data.workers}: the batches are laid out for the new "
            f"number of loader workers (a continuation, not an exact replay)")
    process = process_group.setup(cfg.run.device)
    trainer = None
    try:
        if not samples.meta.stored_crops:  # stored crops are the teacher's pixels on any device
            recorded = samples.meta.preprocessing.decode_device
            check_decode_device(recorded, process.device.type, str(samples.path), "this run trains on")
        trainer = Trainer(cfg, process, samples, payload)
        return trainer.run(stop_at, log, progress)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the failed frames hold the DDP model and the optimizer
        raise
    finally:
        if trainer is not None:
            trainer.release()
        gc.collect()
        process_group.shutdown(process)




class Trainer:
    """The state of one training invocation: model, DDP wrapper, optimizer, batches, schedule and logs."""

    def __init__(self, cfg: TrainConfig, process: process_group.Process, samples: StoreReader, payload: dict | None):
        self.cfg, self.process, self.samples = cfg, process, samples
        self.device = process.device
        self.plan = BatchPlan.reading(
            cfg.data.batch_size, cfg.optim.accum_steps, process.world_size, process.rank, cfg.data.workers,
            len(samples), cfg.data.shuffle_window * samples.meta.chunk_size,
        )
        self.schedule = make_schedule(cfg.schedule, cfg.optim, len(samples), self.plan.effective_batch)
        if payload is not None:
            check_effective_batch(payload, self.plan.effective_batch)
        torch.manual_seed(cfg.run.seed)
        self.model = ZeroSeg(cfg.model).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.start_step = 0
        if payload is not None:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            restore_rng(payload["rng"])
            self.start_step = payload["step"]
        # Ablations leave the same parts of the model without gradient in every step (mask ratio 0: the
        # decoder; grids (1,): the segment projection); DDP's static-graph mode learns which after step one.
        # The gradients are views of DDP's buckets (no copy between them); the model's only buffers are its fixed
        # sin-cos positions, equal on every process, so they are never broadcast.
        every_part_trained = cfg.model.masks_patches and bool(cfg.loss.matching_grids)
        self.ddp = (
            DistributedDataParallel(
                self.model,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                static_graph=not every_part_trained,
                gradient_as_bucket_view=True,
                broadcast_buffers=False,
            )
            if process.distributed
            else self.model
        )
        self.first_bad = torch.tensor(-1, device=self.device)  # the first step with a non-finite loss/gradient
        self.student = torch.compile(self.ddp) if cfg.run.compile else self.ddp  # what the step calls
        self.generator = torch.Generator(self.device)
        self.model_input = ModelInput(samples.meta, cfg.model.image_size, self.device)
        self.crop_size = samples.meta.preprocessing.crop_size
        self.layout = [tuple(view) for view in samples.meta.views]
        self.autocast = torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=cfg.run.bf16 and self.device.type == "cuda"
        )
        self.batches = None

    def run(self, stop_at: int | None, log: Callable[[str], None], progress: bool) -> TrainResult:
        cfg, run_dir = self.cfg, Path(self.cfg.run.dir)
        end = self.schedule.total_steps if stop_at is None else min(stop_at, self.schedule.total_steps)
        started = time.perf_counter()
        last_checkpoint = latest_checkpoint(run_dir)
        if self.start_step >= end:
            step = self.start_step
            return TrainResult(run_dir, step, step, self.schedule.total_steps, last_checkpoint, 0.0)
        main = self.process.is_main
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(run_dir / CONFIG_FILE, config_yaml(cfg))
            log(self._describe(end))
        metrics = MetricsLog(run_dir, self.start_step if self.start_step else None) if main else None
        accum = cfg.optim.accum_steps
        dataset = StoreBatches(self.samples, self.plan, cfg.data.shuffle_window, cfg.run.seed)
        loader = make_loader(
            dataset, self.start_step * accum, end * accum, cfg.data.workers, cfg.data.prefetch,
            pin=self.device.type == "cuda",
        )
        self.batches = DeviceBatches(iter(loader), self.device, self.crop_size, self.samples.path)
        bar = tqdm(total=end, initial=self.start_step, unit="step", desc="zs-train",
                   disable=bar_disabled(main and progress))
        interval = Interval(time.perf_counter(), self.device)
        stop_every = STOP_EVERY if self.process.distributed else 1  # a single process checks a flag on the host
        stop_signal = None
        try:
            with StopRequest() as stop:
                for step in range(self.start_step, end):
                    interval.add(*self.train_step(step))
                    done = step + 1
                    bar.update()
                    if done < end and done % stop_every == 0 and stop.agreed(self.process):  # a scheduler asked
                        end = done
                        stop_signal = stop.signal or signal.SIGTERM  # SIGTERM when another rank was signalled
                    logs = done % cfg.run.log_every == 0 or done == end
                    saves = done % cfg.run.checkpoint_every == 0 or done == end
                    if not (logs or saves):
                        continue
                    means, first_bad = interval.read(self.first_bad)  # the host waits for the device here only
                    if first_bad >= 0:
                        raise self.diverged(first_bad, done)
                    if main and logs:
                        epoch = done * self.plan.effective_batch / len(self.samples)
                        record = interval.record(means, done, epoch, self.plan.effective_batch, started)
                        metrics.write(record)
                        bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}")
                    if logs:
                        interval = Interval(time.perf_counter(), self.device)
                    if saves:
                        last_checkpoint = self.save(done)
                    if done == end:
                        break
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        seconds = time.perf_counter() - started
        return TrainResult(
            run_dir, self.start_step, end, self.schedule.total_steps, last_checkpoint, seconds, stop_signal
        )

    def train_step(self, step: int) -> tuple[torch.Tensor, float, float]:
        """One optimizer step (0-based index `step`): (STEP_VALUES and the gradient norm before clipping, on the
        device; the lr; seconds this process waited for its batches). Nothing in it waits for the device."""
        cfg, process = self.cfg, self.process
        accum = cfg.optim.accum_steps
        terms = torch.zeros(len(STEP_VALUES), device=self.device)
        data_wait = 0.0
        for accum_pass in range(accum):
            waiting = time.perf_counter()
            batch = next(self.batches)
            data_wait += time.perf_counter() - waiting
            images = self.model_input(batch.crops)  # (B, S, S, 3) uint8 on the device -> (B, 3, H, W)
            features = batch.features  # (B, V, D) on the device
            self.generator.manual_seed(noise_seed(cfg.run.seed, step, accum_pass * process.world_size + process.rank))
            defer_sync = process.distributed and accum_pass < accum - 1  # DDP averages on the last pass only
            with self.ddp.no_sync() if defer_sync else nullcontext():
                with self.autocast:
                    output = self.student(images, generator=self.generator)
                    losses = total_loss(output, images, features, self.layout, cfg.loss, cfg.model)
                (losses["total"] / accum).backward()
            terms += torch.stack([losses[name].detach().float() for name in STEP_VALUES]) / accum
        terms = process_group.mean_over_processes(terms, process)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.optim.clip_grad is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        finite = torch.isfinite(terms[0]) & torch.isfinite(grad_norm)  # the same on every process
        self.first_bad = torch.where(finite | (self.first_bad >= 0), self.first_bad, step)
        self.optimizer.found_inf = (self.first_bad >= 0).float()  # fused AdamW skips the whole update when 1
        lr = self.schedule.lr(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.cat([terms, grad_norm.float()[None]]), lr, data_wait

    def diverged(self, first_bad: int, done: int) -> TrainingDiverged:
        last = latest_checkpoint(self.cfg.run.dir)
        kept = f"the last checkpoint is {last}" if last else "no checkpoint had been written yet"
        return TrainingDiverged(
            f"non-finite loss or gradient in step {first_bad + 1}, found after step {done} (read every "
            f"run.log_every steps); stopped without applying it or any later step, after {first_bad} good steps; "
            f"{kept}"
        )

    def save(self, step: int) -> Path:
        """Checkpoint after `step` steps (written by rank 0; every process waits for it)."""
        path = None
        if self.process.is_main:
            path = save_checkpoint(self.cfg, step, self.plan.effective_batch, self.process.world_size, self.model,
                                   self.optimizer, self.samples.identity())
        process_group.barrier(self.process)
        return path

    def release(self) -> None:
        """Drop the DDP model, the optimizer and the batches (their thread, the loader's workers) before the process
        group."""
        if isinstance(self.batches, DeviceBatches):
            self.batches.close()
        del self.student, self.ddp, self.optimizer, self.batches

    def _describe(self, end: int) -> str:
        plan, schedule = self.plan, self.schedule
        epochs = schedule.total_steps * plan.effective_batch / len(self.samples)
        return (
            f"zs-train: {len(self.samples)} images of {self.samples.path}, effective batch {plan.effective_batch} "
            f"({plan.batch} x {plan.accum} passes x {plan.world} processes) on {self.device}; steps "
            f"{self.start_step}..{end} of {schedule.total_steps} ({epochs:.3g} epochs), warm-up "
            f"{schedule.warmup_steps}, peak lr {schedule.peak_lr:.3g}"
        )


class Interval:
    """Sums over the steps between two metric lines (trainer.metrics_log documents the record): the loss terms
    and gradient norms on the device, read once."""

    def __init__(self, began: float, device: torch.device):
        self.began = began
        self.steps = 0
        self.sums = torch.zeros(len(STEP_VALUES) + 1, dtype=torch.float64, device=device)  # STEP_VALUES, grad_norm
        self.data_wait = 0.0
        self.lr = 0.0

    def add(self, values: torch.Tensor, lr: float, data_wait: float) -> None:
        self.steps += 1
        self.sums += values
        self.lr = lr
        self.data_wait += data_wait

    def read(self, first_bad: torch.Tensor) -> tuple[dict[str, float], int]:
        """(the means of STEP_VALUES and grad_norm, the first non-finite step or -1) in one host read."""
        *sums, bad = torch.cat([self.sums, first_bad.double()[None]]).tolist()
        return {name: total / max(self.steps, 1) for name, total in zip((*STEP_VALUES, "grad_norm"), sums)}, int(bad)

    def record(self, mean: dict[str, float], step: int, epoch: float, effective_batch: int, started: float) -> dict:
        now = time.perf_counter()
        seconds = max(now - self.began, 1e-9)
        return {
            "step": step, "epoch": epoch, "lr": self.lr, "loss": mean["total"],
            **{name: mean[name] for name in LOSS_TERMS}, "grad_norm": mean["grad_norm"],
            "images_per_s": self.steps * effective_batch / seconds,
            "data_wait": min(1.0, self.data_wait / seconds), "elapsed_s": now - started,
        }  # fmt: skip
