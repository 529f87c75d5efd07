"""The run loop shared by pre-training and fine-tuning: `fit(cfg, task)`.

`fit` owns what every training run does the same way: distributed set-up, the run folder (config,
log, metrics), resume from the newest checkpoint (mid-epoch if that is where it stopped), the lr
schedule, the optimizer, epochs, checkpoints and stop signals. What differs between pre-training
and fine-tuning (the model, the loader, parameter groups, end-of-epoch work) comes from a `Task`.

Restarting the same command resumes and continues the same trajectory: order, augmentation,
masks and drop-path noise are functions of (seed, epoch, step, rank), never of how the run got there.

Checkpoints: every run.save_every epochs, every run.save_every_minutes mid-epoch (rank 0's clock
decides, the ranks agree at their stop checks), and on the way out of a stopped run:
- SIGTERM / SIGUSR1 (preemption, a scheduler's time limit): the current step finishes, a checkpoint
  is written and the process exits with REQUEUE_EXIT, which trainer/run.sh turns into a requeue.
- A data file that fails mid-run (DatasetError from the loader, on any rank): every rank stops at
  the same step (the ranks agree before each micro-batch's first collective), the last complete
  step is saved (by every rank under FSDP2) and the run ends with one line naming the file, the
  rank and the command that rebuilds the list.
Checkpoints go through a checkpointer (checkpoint.py): torch.save files for DDP, DCP folders for
FSDP2; both follow the same run-folder rules (runfolder.py). With run.mirror they are also
uploaded to an object store in the background, and a run folder without a checkpoint resumes from
the store's newest complete one (mirror.py).
The run folder is one job's (runfolder.RunLock); nothing but that lock file is written before every
input is checked: the paths (`check_inputs`), then, under the lock, the checkpoint to resume (its
config against the new one: a key that defines the run may not change) and the task's model and
loaders (`task.build` opens the data and reads a pretrained checkpoint). A refusal on the way
removes the lock file again (and the folder, if the lock made it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from simmim.core.errors import CheckpointError, ConfigError, DatasetError
from simmim.core.io import check_folder_writable
from simmim.core.seeding import keyed_rng
from simmim.pipeline.loader import Loader
from simmim.pipeline.loaders import INSTALL, available, validate_data_args

from .checkpoint import Checkpointer, all_checkpoints, make_checkpointer, newest_readable_checkpoint
from .config import Config, save_config
from .distributed import (DistInfo, PeerLost, barrier, cleanup, first_reported, host_any, init_distributed,
                          peer_lost)
from .engine import BatchTransform, EpochHooks, EpochResult, PeerDataFailure, Stop, StepOptions, Trainer
from .mirror import Mirror, MirrorBehind, MirroredCheckpointer, check_mirror, restore_from_mirror
from .monitor import RunMonitor, plot_curves, read_metrics
from .parallel import is_fsdp, wrap_for_training
from .precision import amp_dtype_for
from .runfolder import RunLock, check_resume_config, job_id, remove_leftovers, set_aside
from .runlog import HeldRecords, MetricsLog, StopFlag, close_run_log, one_line, setup_logging
from .schedule import LRSchedule
from .validate import validate_config

log = logging.getLogger("simmim")
REQUEUE_EXIT = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; run again to continue
MIRROR_BEHIND_EXIT = 3  # ended with its newest checkpoint missing from run.mirror (MirrorBehind)


class Preempted(Exception):
    """Stopped by a signal after writing a checkpoint (on every rank: rank 0 alone says so)."""


class Diverged(Exception):
    """Too many consecutive non-finite steps."""


class DataFailure(DatasetError):
    """A data file failed mid-run; the steps before it are saved. Raised on every rank with the
    same message, which rank 0 alone prints (`all_ranks`)."""
    all_ranks = True


class Task(Protocol):
    """What a kind of training (pre-training, fine-tuning) gives `fit`."""

    # applied by the engine to every micro-batch before the forward, inside the step's seeded
    # generators (fine-tuning: (images, labels) -> (images, targets), random erasing and mixup /
    # cutmix); None: batches go to the model as the loader yields them. Set by `build`.
    batch_transform: BatchTransform | None
    # the checkpoint of run.out_dir this run resumes from (None: a fresh start), set by `setup_run`
    # before `build`: weights a fresh start would load (model.init_from) are not read for a resume
    resuming: Path | None

    def build(self, dist: DistInfo) -> tuple[nn.Module, Loader]:
        """The model (on dist.device; `model(*batch)` returns the loss) and the training loader
        (`set_epoch(epoch, start_batch)`, `len()`, `num_samples`)."""

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The optimizer's parameter groups (a group's `lr_scale` multiplies the schedule's lr)."""

    def describe_data(self) -> str:
        """One phrase for the start-of-run log line about the data."""

    def inputs(self) -> dict[str, tuple[str, str]]:
        """The files and folders the run reads, checked before anything is written:
        {config key: (path, what to do if it is missing)}; empty paths are not used."""

    def prepare(self, model: nn.Module, loader, dist: DistInfo) -> None:
        """Work that needs the built loader, before the first step (e.g. a fixed figure batch)."""

    def checkpoint_extra(self) -> dict:
        """Saved in every checkpoint beside the train state (fine-tuning: the class names, in head
        order); plain data only."""

    def after_epoch(self, model: nn.Module, epoch: int, last: bool, out_dir: Path, dist: DistInfo,
                    amp_dtype: torch.dtype | None) -> dict:
        """End-of-epoch work (figures, evaluation); returns extra metrics for the epoch's record
        (floats) and the figures it wrote (Paths, shown in TensorBoard under their keys)."""


@dataclass
class TrainState:
    """Where a run stands, saved in every checkpoint beside the weights and optimizer state.

    `step_in_epoch` counts optimizer steps of `epoch` completed (steps_per_epoch at an epoch's end);
    `global_batch` and `world_size` let a resume on another world size keep the global batch."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_batch: int = 0
    world_size: int = 1
    skipped_steps: int = 0  # steps skipped for a non-finite gradient, in total
    # the epoch's loss so far (steps 0 .. step_in_epoch - 1), so that a mid-epoch resume reports the
    # whole epoch's mean: the sum of the finite steps' losses (mean over ranks) and their count
    epoch_loss_sum: float = 0.0
    epoch_good_steps: int = 0
    # what a resume checks the data against (0 / "": a checkpoint of an earlier version, not checked)
    steps_per_epoch: int = 0
    num_samples: int = 0
    data_fingerprint: str = ""
    # global step = step_offset + epoch * steps_per_epoch + step_in_epoch: nonzero once a resume met
    # other steps per epoch (other data, another global batch), so the count goes on from the checkpoint
    step_offset: int = 0

    @property
    def global_step(self) -> int:
        return self.step_offset + self.epoch * self.steps_per_epoch + self.step_in_epoch

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "TrainState":
        """From a checkpoint's `train_state`."""
        s = cls()
        s.load_state_dict(ckpt["train_state"])
        return s


def resolve_accumulation(state: TrainState | None, batch_size: int, world_size: int, accum: int) -> int:
    """Keeps a resumed run's global batch when the world size changed, through accumulation;
    if that cannot be done exactly, says what changes."""
    if state is None or state.global_batch == batch_size * world_size * accum:
        return accum
    old = state.global_batch
    if old % (batch_size * world_size) == 0:
        new_accum = old // (batch_size * world_size)
        log.warning("world size %d -> %d: train.accum_steps %d -> %d keeps the global batch at %d",
                    state.world_size, world_size, accum, new_accum, old)
        return new_accum
    log.warning("world size %d -> %d: the global batch changes from %d to %d (%d is not a multiple of "
                "%d x %d ranks); the lr is rescaled to the new batch and the schedule to the new "
                "steps per epoch", state.world_size, world_size, old, batch_size * world_size * accum, old,
                batch_size, world_size)
    return accum


def build_schedule(o, t, global_batch: int, steps_per_epoch: int) -> LRSchedule:
    """The per-step lr: base values scaled by global batch / 512 (the paper's rule)."""
    scale = global_batch / 512
    return LRSchedule(
        lr=o.base_lr * scale, warmup_lr=o.warmup_lr * scale, min_lr=o.min_lr * scale,
        warmup_steps=t.warmup_epochs * steps_per_epoch, total_steps=t.epochs * steps_per_epoch,
        kind=o.scheduler, milestones=tuple(e * steps_per_epoch for e in o.milestones), gamma=o.gamma,
        anchor=o.cosine_anchor)


@dataclass
class Run:
    """Everything one training run holds between its set-up and its end; the step's own state
    (model, optimizer, scaler, schedule, skipped-step counters) is the trainer's."""
    cfg: Config
    task: Task
    dist: DistInfo
    out_dir: Path
    trainer: Trainer
    loader: Loader
    state: TrainState  # written into each checkpoint
    metrics: Callable[[dict], None]
    monitor: RunMonitor
    checkpointer: Checkpointer  # torch.save files (ddp) | DCP folders (fsdp)
    carried: tuple[float, int] = (0.0, 0)  # the resumed epoch's loss sum and good steps before the resume
    last_save: float = dataclasses.field(default_factory=time.monotonic)

    def record(self, rec: dict) -> None:
        """One metrics.jsonl record, also sent to TensorBoard / W&B (rank 0); a failed write is a warning."""
        self.monitor.soft("metrics.jsonl", lambda: self.metrics(rec))
        self.monitor.log(rec)

    def checkpoint(self, epoch: int, step_in_epoch: int, loss_sum: float = 0.0, good_steps: int = 0,
                   any_rank: bool = False) -> Path | None:
        """checkpoint-{global step}: every rank calls this; DDP's rank 0 (or this rank, if
        `any_rank`: DDP's states are replicated) writes one .pt file (the others return None),
        FSDP2's ranks each write their shards of one DCP folder. `loss_sum` / `good_steps` cover
        the epoch's steps so far. CheckpointError if it cannot be written."""
        self.last_save = time.monotonic()
        s, tr = self.state, self.trainer
        s.epoch, s.step_in_epoch, s.skipped_steps = epoch, step_in_epoch, int(tr.skipped.item())
        s.epoch_loss_sum, s.epoch_good_steps = loss_sum, good_steps
        train = {"train_state": s.state_dict(), "scaler": tr.scaler.state_dict(), "config": self.cfg.to_dict(),
                 **self.task.checkpoint_extra()}
        path = self.checkpointer.save(s.global_step, tr.model, tr.optimizer, train, any_rank=any_rank)
        if path is not None and (self.dist.is_main or any_rank):
            log.info("%s %s", "saving (async)" if self.cfg.run.async_save and self.cfg.train.parallel == "fsdp"
                     else "saved", path)
        return path

    def checkpoint_due(self) -> bool:
        """Rank 0's clock only: the ranks agree through the engine's stop check."""
        minutes = self.cfg.run.save_every_minutes
        return self.dist.is_main and minutes > 0 and time.monotonic() - self.last_save >= 60 * minutes

    def epoch_totals(self, res: EpochResult) -> tuple[float, int]:
        """The epoch's loss sum and good steps from its first step, across a resume."""
        return self.carried[0] + res.loss_sum, self.carried[1] + res.good_steps

    def log_step(self, rec: dict) -> None:
        rec["step"] += self.state.step_offset  # the engine counts epoch * steps_per_epoch + step_in_epoch
        self.record(rec)
        log.info("epoch %d step %d  loss %.4f  lr %.3e  grad_norm %.3f  %.1f img/s  data wait %.0f%%%s",
                 rec["epoch"], rec["step"], rec["loss"], rec["lr"], rec["grad_norm"], rec["img_per_s"],
                 100 * rec["data_wait"],
                 f"  skipped {rec['skipped_steps']}" if rec["skipped_steps"] else "")

    def run_epoch(self, epoch: int, start_step: int, stop: StopFlag) -> EpochResult:
        """Steps start_step.. of `epoch`; `loss` of the result is the whole epoch's mean."""
        accum = self.trainer.options.accum_steps
        self.loader.set_accum_steps(accum)  # masks are drawn per optimizer step's global batch
        self.loader.set_epoch(epoch, start_step * accum)
        res = self.trainer.train_epoch(self.loader, epoch, start_step, RunHooks(self, epoch, stop))
        loss_sum, good_steps = self.epoch_totals(res)
        res.loss = loss_sum / good_steps if good_steps else math.nan
        return res

    def stop_early(self, epoch: int, res: EpochResult, stop: StopFlag) -> None:
        """A diverged, signalled or data-failed epoch: checkpoint, leave the process group, raise."""
        self.monitor.close()
        if res.stopped is Stop.DATA and host_any(bool(stop.signum)):  # the loader failed after a stop signal
            # (its workers got it too); the ranks, all stopped for data, agree on which stop this is
            log.info("the loader stopped after %s (%s)", signal.Signals(stop.signum).name, one_line(res.error))
            res.stopped = Stop.SIGNAL
        if res.stopped is Stop.DATA:  # every rank stopped at the same step (engine.forward_backward)
            mine = None if isinstance(res.error, PeerDataFailure) else \
                (one_line(res.error), getattr(res.error, "needs_scan", True))
            rank, (what, needs_scan) = first_reported(mine) or (self.dist.rank, (one_line(res.error), True))
            fix = "" if "simmim scan" in what or not needs_scan else (
                f"; rebuild the file list with `simmim scan {self.cfg.data.path}` (it leaves out unreadable files) "
                f"and point data.path at it")
            path = self.checkpoint(epoch, res.steps_done, *self.epoch_totals(res))
            self.checkpointer.wait()
            _, path = first_reported(str(path) if path else None) or (0, path)  # rank 0's (DDP) or every rank's
            cleanup()
            where = f"rank {rank}, " if self.dist.world_size > 1 else ""
            raise DataFailure(f"{what} ({where}at step {res.steps_done} of epoch {epoch}){fix}; the steps before it are "
                              f"saved in {path}: run the same command again to resume")
        stop()  # another rank's signal may have stopped the group before this rank's arrived: say it once here
        path = self.checkpoint(epoch, res.steps_done, *self.epoch_totals(res))  # skipped steps left weights as they were
        self.checkpointer.wait()
        if isinstance(self.checkpointer, MirroredCheckpointer) and self.dist.is_main and \
                (behind := self.checkpointer.missing()):  # the status stays the stop's (75: requeued)
            log.error("%s", behind)
        _, path = first_reported(str(path) if path else None) or (0, path)  # rank 0's (DDP) or every rank's
        barrier()
        cleanup()
        if res.stopped is Stop.DIVERGED:
            raise Diverged(f"{self.cfg.train.max_skipped_steps} consecutive steps had a non-finite loss or "
                           f"gradient (epoch {epoch}); the weights from before are in {path or self.out_dir}: "
                           f"lower optim.base_lr or raise train.max_skipped_steps")
        stop()
        raise Preempted(f"stopped by {signal.Signals(stop.signum).name if stop.signum else 'a signal'} "
                        f"at epoch {epoch}, step {res.steps_done}: run the same command to resume from {path}")

    def end_epoch(self, epoch: int, res: EpochResult, elapsed: float) -> dict:
        """The periodic checkpoint first (what the epoch cost is kept whatever follows fails), then
        the task's end-of-epoch work, the epoch record and the curves (failed writes: warnings)."""
        self.carried = (0.0, 0)
        last = epoch == self.cfg.train.epochs - 1
        tr = self.trainer
        if (epoch + 1) % self.cfg.run.save_every == 0 or last:
            self.checkpoint(epoch, tr.steps_per_epoch)
        out = self.task.after_epoch(tr.model, epoch, last, self.out_dir, self.dist, tr.options.amp_dtype)
        extra = {k: v for k, v in out.items() if not isinstance(v, Path)}
        log.info("epoch %d done: mean loss %.4f%s (%.0f s elapsed)", epoch, res.loss,
                 "".join(f", {k} {v:.4g}" for k, v in extra.items()), elapsed)
        if self.dist.is_main:
            step = self.state.step_offset + (epoch + 1) * tr.steps_per_epoch - 1
            self.record({"epoch": epoch, "step": step, "epoch_loss": res.loss, **extra})
            for tag, png in out.items():
                if isinstance(png, Path):
                    self.monitor.image(tag, png, step)
            self.monitor.soft("curves.png", lambda: plot_curves(
                {self.out_dir.name: read_metrics(self.out_dir)}, self.out_dir / "curves.png",
                title=f"{self.cfg.model.arch}, {self.out_dir}"))
        barrier()
        return {"epoch": epoch, "loss": res.loss, "steps": tr.steps_per_epoch, **extra}


class RunHooks(EpochHooks):
    """What an epoch of `run` asks of it: log lines, the stop flag, timed checkpoints."""

    def __init__(self, run: Run, epoch: int, stop: StopFlag):
        self.run, self.epoch, self.stop = run, epoch, stop

    def log(self, record: dict) -> None:
        self.run.log_step(record)

    def stop_requested(self) -> bool:
        return self.stop()

    def checkpoint_due(self) -> bool:
        return self.run.checkpoint_due()

    def save(self, steps_done: int, loss_sum: float, good_steps: int) -> None:
        carried = self.run.carried
        self.run.checkpoint(self.epoch, steps_done, carried[0] + loss_sum, carried[1] + good_steps)


# the task's inputs that are not data sources (checked for existence only; the task reads them in `build`)
NOT_DATA = ("finetune.pretrained", "model.init_from")


def check_inputs(cfg: Config, task: Task) -> None:
    """Before the run folder is made: ConfigError for a run.out_dir that cannot be written (read-only,
    immutable, a file); DatasetError / CheckpointError, one line naming the key, for an empty data.path, a data option out of place (a .beton for a backend that does not read one,
    or the reverse, for data.path and every other data source of the task), a backend that is not
    installed, an input of the task that does not exist, or (ConfigError) a run.mirror that cannot be written. What needs the inputs opened (an empty
    folder, a bad list line, a checkpoint of another arch) is found by `task.build`, which also
    runs before anything but the provisional lock file is written (`setup_run`)."""
    check_folder_writable(cfg.run.out_dir, "run.out_dir", ConfigError)  # before an hour of set-up, not after
    if cfg.run.mirror:
        check_mirror(cfg.run.mirror)  # a bad bucket, no credentials, no endpoint: one line now, not at each save
    d = cfg.data
    validate_data_args(d.backend, d.path)
    if not available(d.backend):
        raise DatasetError(f"data.backend {d.backend} is not installed: {INSTALL[d.backend][1]}")
    for key, (path, hint) in task.inputs().items():
        if path and "://" not in path and not Path(path).exists():  # a URL (data.backend stream) is opened by `build`
            error = CheckpointError if key in NOT_DATA else DatasetError
            raise error(f"{key} '{path}' does not exist: {hint}")
        if path and key not in NOT_DATA and key != "data.path":
            validate_data_args(d.backend, path, key)


def read_run_folder(cfg: Config) -> tuple[Path | None, dict | None, list, list[str]]:
    """Reads only: the newest readable checkpoint of run.out_dir (path, contents; None if there is
    none), the unreadable newer ones, and the changed keys a resume allows (ConfigError for one it
    does not allow)."""
    ckpt, bad = newest_readable_checkpoint(Path(cfg.run.out_dir))
    changed = check_resume_config(ckpt.config, cfg.to_dict(), ckpt.path) if ckpt is not None else []
    return ckpt.path if ckpt is not None else None, ckpt, bad, changed


def write_run_folder(cfg: Config, dist: DistInfo, lock: RunLock | None, held: HeldRecords | None,
                     resumed: Path | None, bad: list, changed: list[str]) -> None:
    """Once every input is open: the folder becomes the run's (the lock commits), what a killed run
    left half-written is removed, then its config.yaml and log.txt (with what was logged while the inputs were opened); unreadable
    checkpoints are set aside."""
    out_dir = Path(cfg.run.out_dir)
    if dist.is_main:
        if lock is not None:
            lock.commit()
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out_dir)  # what a killed run left half-written: this job owns the folder now
        save_config(cfg, out_dir / "config.yaml")
    setup_logging(out_dir if dist.is_main else None, dist.is_main, held)
    if dist.is_main and bad:
        set_aside(bad, resumed)
    if changed:
        log.info("resuming with changed %s", ", ".join(changed))


def build_model(cfg: Config, task: Task, dist: DistInfo) -> tuple[nn.Module, Loader]:
    t = cfg.train
    with keyed_rng("init", t.seed):  # identical initial weights on every rank; global RNG restored after
        model, loader = task.build(dist)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if t.channels_last and dist.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, loader


def build_trainer(cfg: Config, task: Task, dist: DistInfo, model: nn.Module, schedule: LRSchedule,
                  options: StepOptions, steps_per_epoch: int) -> Trainer:
    """The model wrapped for training (DDP, FSDP2, torch.compile), AdamW over the task's parameter
    groups, the GradScaler (enabled for fp16 only) and the step around them."""
    t, o = cfg.train, cfg.optim
    # FSDP2 shards `model` in place: the optimizer is built afterwards, on the shards
    train_model = wrap_for_training(model, t.parallel, dist.world_size, dist.device, options.amp_dtype,
                                    t.cpu_offload, t.compile)
    make = getattr(task, "optimizer", None)  # a task's own (the linear probe's LARS / SGD); else AdamW
    optimizer = make(task.param_groups(model), schedule.lr) if make else \
        torch.optim.AdamW(task.param_groups(model), lr=schedule.lr, betas=o.betas, eps=o.eps, fused=True)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=options.amp_dtype is torch.float16)
    return Trainer(model, optimizer, schedule, options, steps_per_epoch=steps_per_epoch, train_model=train_model,
                   scaler=scaler, batch_transform=task.batch_transform, rank=dist.rank, world_size=dist.world_size,
                   device=dist.device)


def setup_run(cfg: Config, task: Task, dist: DistInfo, lock: RunLock | None = None) -> tuple[Run, int, int]:
    """Builds everything and resumes; returns the run and the (epoch, step) to start from. Nothing
    is written to the run folder (but rank 0's provisional lock file) until the checkpoint to resume
    is read and checked and the task's model and loaders are built: every input is open by then
    (the sample lists made, the pretrained checkpoint loaded), so an input refused on the way
    leaves no config.yaml or log.txt behind, and nothing is opened twice."""
    d, t, o = cfg.data, cfg.train, cfg.optim
    setup_logging(None, dist.is_main)  # console only until the folder is known to be this run's
    held = HeldRecords() if dist.is_main else None
    if held is not None:
        logging.getLogger().addHandler(held)
    out_dir = Path(cfg.run.out_dir)
    try:
        amp_dtype = amp_dtype_for(t.precision, dist.device)
        mirror = Mirror(cfg.run.mirror, dist.rank, dist.world_size, cfg.run.keep_last) if cfg.run.mirror else None
        if mirror is not None:  # the mirror's newest complete checkpoint, where no rank has one as new
            restore_from_mirror(mirror, out_dir, dist, cfg.to_dict())
        resumed, ckpt, bad, changed = read_run_folder(cfg)  # all but a DCP checkpoint's tensors
        task.resuming = resumed
        model, loader = build_model(cfg, task, dist)
        old = TrainState.from_checkpoint(ckpt.train) if ckpt is not None else None
        accum = resolve_accumulation(old, d.batch_size, dist.world_size, t.accum_steps)
        global_batch = d.batch_size * dist.world_size * accum
        steps_per_epoch = len(loader) // accum
        if steps_per_epoch == 0:
            raise ConfigError(f"{len(loader)} batches per epoch do not fill one step of {accum} "
                              f"accumulation steps: lower train.accum_steps or data.batch_size")
    finally:
        logging.getLogger().removeHandler(held)  # (no-op for None)
    write_run_folder(cfg, dist, lock, held, resumed, bad, changed)
    checkpointer = make_checkpointer(t.parallel, out_dir, dist.is_main, cfg.run.keep_last, cfg.run.async_save,
                                     node_main=dist.local_rank == 0)
    if mirror is not None:
        checkpointer = MirroredCheckpointer(checkpointer, mirror, cfg.run.mirror_wait_s)
        checkpointer.catch_up(cfg.to_dict())
    schedule = build_schedule(o, t, global_batch, steps_per_epoch)
    options = StepOptions(accum_steps=accum, clip_grad=o.clip_grad, amp_dtype=amp_dtype, seed=t.seed,
                          max_skipped_streak=t.max_skipped_steps, log_every=cfg.run.log_every,
                          stop_check_every=cfg.run.stop_check_every,
                          progress=cfg.run.progress and dist.is_main and sys.stderr.isatty())
    trainer = build_trainer(cfg, task, dist, model, schedule, options, steps_per_epoch)
    state = TrainState(global_batch=global_batch, world_size=dist.world_size, steps_per_epoch=steps_per_epoch,
                       num_samples=loader.num_samples, data_fingerprint=loader.fingerprint())
    epoch, start_step, carried = 0, 0, (0.0, 0)
    if ckpt is not None:
        checkpointer.load(ckpt, model, trainer.optimizer)  # in place; FSDP2: each rank its shards
        trainer.scaler.load_state_dict(ckpt.train.get("scaler") or {})
        trainer.skipped += old.skipped_steps
        epoch, start_step, carried, state.step_offset = resume_point(old, state, resumed)
    resume_step = state.step_offset + epoch * steps_per_epoch + start_step if ckpt else None
    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step) if dist.is_main else (lambda record: None)
    monitor = RunMonitor(out_dir, dist.is_main, cfg.run.tensorboard, cfg.run.wandb, cfg.to_dict(), resume_step)
    task.prepare(model, loader, dist)
    run = Run(cfg, task, dist, out_dir, trainer, loader, state, metrics, monitor, checkpointer, carried)
    log_start(run, schedule)
    return run, epoch, start_step


def resume_point(old: TrainState, new: TrainState, path: Path) -> tuple[int, int, tuple[float, int], int]:
    """(epoch, step, the epoch's carried loss sum and good steps, step offset) to resume `old` (a
    checkpoint's state, at `path`) with `new`'s data and steps per epoch. The same data and steps per
    epoch: where it stopped. Other steps per epoch (a list rescanned or replaced, another batch):
    the same fraction of the same epoch (the schedule is in epochs, so the lr goes on where it
    stopped), and the global step goes on from the checkpoint's, never back; a warning names what
    changed. The data itself changed (its size or fingerprint): the same, with a warning."""
    spe, old_spe = new.steps_per_epoch, old.steps_per_epoch or new.steps_per_epoch  # (0: an earlier version)
    changed = []
    if old.num_samples and old.num_samples != new.num_samples:
        changed.append(f"{old.num_samples} -> {new.num_samples} samples")
    elif old.data_fingerprint and old.data_fingerprint != new.data_fingerprint:
        changed.append(f"the sample list differs (fingerprint {old.data_fingerprint} -> {new.data_fingerprint})")
    if old_spe != spe:
        changed.append(f"{old_spe} -> {spe} steps per epoch")
    step = min(old.step_in_epoch, spe) if old_spe == spe else min(spe, round(old.step_in_epoch * spe / old_spe))
    epoch, carried = old.epoch, (old.epoch_loss_sum, old.epoch_good_steps)
    if step == spe:
        epoch, step, carried = epoch + 1, 0, (0.0, 0)
    offset = old.step_offset + old.epoch * old_spe + old.step_in_epoch - (epoch * spe + step)
    if changed:
        log.warning("the data changed since %s (%s): resuming at epoch %d, step %d of %d (the same share of the "
                    "epoch; %d of %d before); the global step goes on from %d", path.name, ", ".join(changed),
                    epoch, step, spe, old.step_in_epoch, old_spe, offset + epoch * spe + step)
    log.info("resumed from %s: epoch %d, step %d of %d", path, epoch, step, spe)
    return epoch, step, carried, offset


def log_start(run: Run, schedule: LRSchedule) -> None:
    cfg, dist = run.cfg, run.dist
    d, t, o = cfg.data, cfg.train, cfg.optim
    tr = run.trainer
    n_params = sum(p.numel() for p in tr.model.parameters())
    amp_dtype = tr.options.amp_dtype
    precision = {None: "fp32"}.get(amp_dtype, str(amp_dtype).removeprefix("torch."))
    sharding = "FSDP2" + (" + CPU offload" if t.cpu_offload else "") if is_fsdp(tr.model) else \
        "DDP" if dist.world_size > 1 else "one process"
    log.info("model %s: %.1fM parameters, %s, precision %s, world size %d (%s)%s%s", cfg.model.arch,
             n_params / 1e6, dist.device, precision, dist.world_size, sharding, ", compiled" if t.compile else "",
             ", activation checkpointing" if t.grad_checkpointing else "")
    classes = run.loader.classes  # [] for unlabeled data (a .beton says so in its classes.json)
    kind = "unlabeled" if classes == [] else f"{len(classes)} classes" if classes else "classes not recorded"
    log.info("data %s: %d images (%s), %s, %d steps/epoch, global batch %d (%d x %d ranks x %d accum)",
             run.loader.describe(), run.loader.num_samples, kind, run.task.describe_data(), tr.steps_per_epoch,
             run.state.global_batch, d.batch_size, dist.world_size, tr.options.accum_steps)
    s = schedule
    log.info("lr: base %.3g -> effective %.3g (x %.4g = global batch / 512); warmup %.3g, min %.3g",
             o.base_lr, s.lr, run.state.global_batch / 512, s.warmup_lr, s.min_lr)


def fit(cfg: Config, task: Task) -> dict:
    """Trains `task` as `cfg` says (see the module docstring); returns {"epochs": per-epoch
    records, "wall_s", "final_loss", and the last epoch's extra metrics}. Each after writing a
    checkpoint, raises Preempted after a stop signal, Diverged after train.max_skipped_steps
    non-finite steps in a row, DataFailure when a data file fails. RunFolderBusy if another job
    holds run.out_dir, ConfigError if it holds a run of another config or any value of `cfg` is out
    of range, DatasetError / CheckpointError if an input is missing or cannot be used (all before
    anything is written: a provisional lock file is removed again);
    PeerLost if a collective failed because another rank went away."""
    validate_config(cfg)  # a Config built in code, not by load_config, is checked here too
    check_inputs(cfg, task)
    dist = init_distributed(cfg.train.device)
    try:
        with RunLock(cfg.run.out_dir, job_id()) if dist.is_main else contextlib.nullcontext() as lock:
            return train(cfg, task, dist, lock)
    except RuntimeError as e:
        who = peer_lost(e)
        if who is None:
            raise
        found = all_checkpoints(cfg.run.out_dir)
        resume = f"resumes from {found[-1][1]}" if found else "has no checkpoint yet and starts afresh"
        raise PeerLost(f"rank {dist.rank} lost {who} in a collective (it was killed or crashed: see that rank's log; "
                       f"out of memory? a node lost?); run the same command again: the run {resume} "
                       f"(trainer/run.sh restarts it by itself up to MAX_RESTARTS times)") from None
    finally:
        close_run_log()


def train(cfg: Config, task: Task, dist: DistInfo, lock: RunLock | None = None) -> dict:
    run, first_epoch, start_step = setup_run(cfg, task, dist, lock)
    stop = StopFlag(announce=dist.is_main)
    history, start = [], time.perf_counter()
    try:
        for epoch in range(first_epoch, cfg.train.epochs):
            res = run.run_epoch(epoch, start_step, stop)
            start_step = 0
            if res.stopped:
                run.stop_early(epoch, res, stop)
            history.append(run.end_epoch(epoch, res, time.perf_counter() - start))
    finally:
        stop.restore()
    summary = {"epochs": history, "wall_s": time.perf_counter() - start,
               "final_loss": history[-1]["loss"] if history else math.nan,
               **({k: v for k, v in history[-1].items() if k not in ("epoch", "loss", "steps")} if history else {})}
    run.checkpointer.wait()  # an async save in flight
    if history:
        log.info("finished %d epoch%s in %.1f s; run folder %s", len(history), "" if len(history) == 1 else "s",
                 summary["wall_s"], run.out_dir)
    elif first_epoch >= cfg.train.epochs:  # a finished run rerun: say so rather than end on the lr line
        step = run.state.step_offset + first_epoch * run.trainer.steps_per_epoch + start_step
        log.info("run already finished at step %d (%s); nothing to do: raise train.epochs to continue or use a "
                 "new run.out_dir", step, task.resuming)
    run.monitor.close()
    cleanup()
    check_mirror_holds_newest(run)
    return summary


def check_mirror_holds_newest(run: Run) -> None:
    """At the end of a run (rank 0): MirrorBehind if run.mirror lacks the newest local checkpoint,
    unless run.mirror_allow_missing (then one warning)."""
    behind = run.checkpointer.missing() if isinstance(run.checkpointer, MirroredCheckpointer) and \
        run.dist.is_main else None
    if behind is None:
        return
    if not run.cfg.run.mirror_allow_missing:
        raise MirrorBehind(behind)
    log.warning("%s", behind)
