"""The training step, pre-training or fine-tuning: the only place a step is written.

`Trainer` owns what a step reads and changes (the model, the optimizer, the GradScaler, the lr
schedule, the device-side step counters) and the run's fixed step settings (`StepOptions`); the
run loop (loop.py) calls `Trainer.train_epoch` once per epoch, and passes `EpochHooks` for what
the step asks of the run (log a record, is a stop requested, is a checkpoint due, save one).

One path for every combination: autocast (bf16 / fp16 / off), gradient accumulation (DDP's
all-reduce or FSDP2's reduce-scatter skipped on non-final micro-steps), grad-norm clipping (over
all ranks' shards under FSDP2), a GradScaler that is a no-op unless fp16. A step whose gradient
norm is not finite is skipped on the device (the fused AdamW reads a found-inf flag, through
`compat.skip_nonfinite_step`; other optimizers read it on the host), so the host waits on the
device only at log intervals, where the loss, the skipped-step count and a stop request
(preemption signal) are read.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from simmim.core.errors import DatasetError
from simmim.core.seeding import keyed_rng

from .compat import skip_nonfinite_step
from .distributed import all_reduce_mean, any_rank, host_any
from .precision import autocast
from .parallel import clip_grad_norm, sync_context

# A task's transform of a whole batch before the forward, e.g. (images, labels) -> (images, targets)
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Stop(enum.Enum):
    """Why an epoch ended before its last step (NONE: it did not); false only for NONE."""
    NONE = "none"
    SIGNAL = "signal"  # a stop was requested (a preemption signal) on some rank
    DIVERGED = "diverged"  # `max_skipped_streak` steps in a row had a non-finite gradient
    DATA = "data"  # a loader raised a DatasetError on some rank (`EpochResult.error`)

    def __bool__(self) -> bool:
        return self is not Stop.NONE


@dataclass
class EpochResult:
    epoch: int
    steps_done: int  # optimizer steps of this epoch completed (from step 0 of the epoch)
    loss: float  # mean over the steps run in this call, over ranks
    loss_sum: float = 0.0  # sum of the finite steps' losses run in this call (mean over ranks)
    good_steps: int = 0  # steps run in this call that were not skipped
    stopped: Stop = Stop.NONE
    error: DatasetError | None = None  # with Stop.DATA: this rank's error, or PeerDataFailure


class PeerDataFailure(DatasetError):
    """Another rank's loader failed in this step (that rank's DatasetError names the file)."""


@dataclass(frozen=True)
class StepOptions:
    """A run's step settings, fixed from its config (train.*, optim.clip_grad, run.*)."""
    accum_steps: int = 1  # micro-batches per optimizer step
    clip_grad: float = 0.0  # max grad norm over all parameters; 0: no clipping
    amp_dtype: torch.dtype | None = None  # autocast dtype; None: fp32
    seed: int = 0  # keys the per-step generators with (epoch, step, micro-batch, rank)
    max_skipped_streak: int = 100  # non-finite steps in a row that end the epoch (Stop.DIVERGED)
    log_every: int = 10  # steps between log records (and host syncs)
    stop_check_every: int = 10  # steps between the ranks' stop agreements off log steps (several ranks)
    progress: bool = False  # a tqdm bar


class EpochHooks:
    """What an epoch asks of the run; these defaults log nothing, never stop and never save."""

    def log(self, record: dict) -> None:
        """One record of a logged step (see `EpochMeter.record`)."""

    def stop_requested(self) -> bool:
        """This rank's stop request (a signal); the ranks agree on it."""
        return False

    def checkpoint_due(self) -> bool:
        """This rank's view of whether a checkpoint is due; the ranks agree on it."""
        return False

    def save(self, steps_done: int, loss_sum: float, good_steps: int) -> None:
        """Writes a checkpoint after `steps_done` steps of the epoch (every rank calls it);
        loss_sum / good_steps cover this call's steps so far."""


class Throughput:
    """Images (over all ranks, assuming equal batches) and seconds waited on the loader since the
    last log line."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.tick, self.images, self.waited = time.perf_counter(), 0, 0.0

    def add(self, images: int, waited: float) -> None:
        self.images, self.waited = self.images + images, self.waited + waited

    def rates(self) -> dict:
        """{"img_per_s": images/sec over all ranks, "data_wait": share of the time waited}; restarts."""
        elapsed = time.perf_counter() - self.tick
        out = {"img_per_s": self.images * self.world_size / elapsed, "data_wait": self.waited / elapsed}
        self.tick, self.images, self.waited = time.perf_counter(), 0, 0.0
        return out


class EpochMeter:
    """What one `train_epoch` call measures and shows: the current step's loss (`step_loss`,
    accumulated by `forward_backward`), the steps run, those skipped and the finite steps' loss
    sum (0-d device tensors, read only at sync points), throughput since the last record, and the
    progress bar."""

    def __init__(self, device: torch.device, world_size: int, *, epoch: int, steps_per_epoch: int,
                 start_step: int, progress: bool):
        self.step_loss = torch.zeros((), device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        self.steps = 0
        self.throughput = Throughput(world_size)
        self.bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch}", leave=False,
                        disable=not progress, dynamic_ncols=True)

    def add(self, found_inf: torch.Tensor) -> None:
        """Counts the step just taken; a skipped one (found_inf 1.) adds nothing to the loss sum."""
        self.steps += 1
        self.skipped += found_inf
        self.loss_sum += torch.where(found_inf > 0, 0.0, self.step_loss)
        self.bar.update(1)

    def record(self, log: Callable[[dict], None], skipped_total: torch.Tensor, *, epoch: int, step: int,
               lr: float, grad_norm: torch.Tensor) -> None:
        """log(record) for the step just taken: its loss (mean over ranks: an all-reduce and a host
        sync, so at log steps only), lr, grad norm, images/sec and share of the time waited on
        data since the last record, skipped steps in total; the bar shows loss and lr."""
        mean_loss = all_reduce_mean(self.step_loss).item()
        log({"epoch": epoch, "step": step, "loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm),
             **self.throughput.rates(), "skipped_steps": int(skipped_total.item())})
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")

    def totals(self) -> tuple[float, int]:
        """(loss sum, mean over ranks; steps not skipped): an all-reduce and a host sync."""
        return all_reduce_mean(self.loss_sum).item(), self.steps - int(self.skipped.item())

    def close(self) -> tuple[float, int]:
        """Closes the bar; returns `totals()`."""
        self.bar.close()
        return self.totals()


class Trainer:
    """Owns one run's step: the model, the optimizer, the GradScaler (a no-op unless fp16), the
    lr schedule (global step -> lr), the step options and the device-side counters of skipped
    steps (0-d tensors, read only at sync points).

    `model` is the module checkpoints save and evaluation uses (FSDP2 shards it in place);
    `train_model` is what the step calls (`model` wrapped by DDP or torch.compile; default `model`).
    `model(*batch)` returns the loss. `rank` / `world_size` key the random streams and scale the
    throughput; `device` holds the counters (default: the device of the first parameter).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Callable[[int], float],
                 options: StepOptions, *, steps_per_epoch: int, train_model: nn.Module | None = None,
                 scaler: torch.amp.GradScaler | None = None, batch_transform: BatchTransform | None = None,
                 rank: int = 0, world_size: int = 1, device: torch.device | None = None):
        self.model, self.train_model = model, train_model if train_model is not None else model
        self.optimizer, self.schedule, self.options = optimizer, schedule, options
        self.steps_per_epoch = steps_per_epoch
        self.batch_transform = batch_transform
        self.rank, self.world_size = rank, world_size
        self.device = device if device is not None else next(model.parameters()).device
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(self.device.type, enabled=False)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.skipped = torch.zeros((), device=self.device)  # steps skipped for a non-finite gradient, in total
        self.streak = torch.zeros((), device=self.device)  # consecutive skipped steps up to now

    def set_lr(self, step: int) -> float:
        """Sets every group's lr to schedule(step) times its `lr_scale` (layer decay), every step,
        so a scale applies once; returns schedule(step)."""
        lr = self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def forward_backward(self, data: Iterator, step_loss: torch.Tensor, epoch: int, step_in_epoch: int,
                         ) -> tuple[int, float, DatasetError | None]:
        """One optimizer step's `accum_steps` micro-batches: the task's batch transform (fine-tuning:
        random erasing, mixup / cutmix), forward under autocast and the scaled backward; `step_loss`
        (a 0-d tensor) accumulates the step's mean loss on the device. The gradient all-reduce runs
        on the last micro-batch only.

        Before each micro-batch's forward the ranks agree that all of them have their batch
        (`host_any`, a CPU all-reduce, no device sync), ahead of its first collective (FSDP2's
        all-gather, DDP's buffer broadcast): a rank whose loader fails stops every rank at the same
        step, and none waits in a collective for it. Returns (images, seconds the host waited on the
        loader, None, or the DatasetError that stopped the step: this rank's own, or PeerDataFailure)."""
        o = self.options
        images, waited = 0, 0.0
        for micro in range(o.accum_steps):
            t0 = time.perf_counter()
            batch, error = None, None
            try:
                batch = next(data)  # (images, masks) for SimMIM, (images, labels) for fine-tuning
            except DatasetError as e:
                error = e
            waited += time.perf_counter() - t0
            if host_any(error is not None):
                return images, waited, error or PeerDataFailure("another rank's loader failed")
            # random erasing, mixup / cutmix and drop path draw from the global generators: seeded
            # here from (seed, epoch, step, micro, rank), restored afterwards
            with sync_context(self.train_model, micro == o.accum_steps - 1), \
                    keyed_rng("step", o.seed, epoch, step_in_epoch, micro, self.rank, device=self.device):
                if self.batch_transform is not None:
                    batch = self.batch_transform(*batch)  # (images, labels) -> (images, targets)
                with autocast(self.device.type, o.amp_dtype):
                    loss = self.train_model(*batch)
                self.scaler.scale(loss / o.accum_steps).backward()
            step_loss += loss.detach() / o.accum_steps
            images += batch[0].shape[0]
        return images, waited, None

    def update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale, clip (clip_grad 0: no clipping), step, zero the gradients. A step whose gradient
        norm is not finite is skipped on the device and counted. Returns (grad norm, found_inf
        0./1.), both 0-d device tensors: nothing here waits on the device."""
        clip = self.options.clip_grad
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.params, clip if clip > 0 else float("inf"))
        found_inf = (~torch.isfinite(grad_norm)).float()
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # fp16: the scaler skips non-finite steps itself
        else:
            skip_nonfinite_step(self.optimizer, found_inf)  # fused AdamW: decided on the device, no host sync
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += found_inf
        self.streak = (self.streak + found_inf) * found_inf
        return grad_norm, found_inf

    def agree_on_stop(self, hooks: EpochHooks, meter: EpochMeter, steps_done: int) -> bool:
        """True if a stop is requested on any rank (one all-reduce, on every rank). Otherwise, if a
        checkpoint is due on any rank, hooks.save(steps done, loss sum, good steps) runs on every rank."""
        stop, save_now = any_rank([hooks.stop_requested(), hooks.checkpoint_due()], self.device)
        if not stop and save_now:
            hooks.save(steps_done, *meter.totals())
        return bool(stop)

    def train_epoch(self, loader: Iterable, epoch: int, start_step: int = 0,
                    hooks: EpochHooks | None = None) -> EpochResult:
        """Runs optimizer steps start_step .. steps_per_epoch - 1 of `epoch` (each `accum_steps`
        micro-batches; the loader must already be positioned at start_step).

        Every `log_every` steps: hooks.log(record) with the step's loss (mean over ranks), lr, grad
        norm, images/sec and skipped steps; then a stop is honoured if requested on any rank, or if
        `max_skipped_streak` steps in a row were skipped (Stop.DIVERGED). Where ranks agree on a
        stop, they also agree on a checkpoint: if `hooks.checkpoint_due()` is true on any rank,
        hooks.save(...) runs on every rank and the epoch goes on.

        A DatasetError from the loader on any rank (a file unreadable mid-run) ends the epoch on
        every rank at the last complete step (Stop.DATA; `error` is this rank's DatasetError, or a
        PeerDataFailure on the other ranks).
        """
        o, hooks = self.options, hooks if hooks is not None else EpochHooks()
        self.train_model.train()
        meter = EpochMeter(self.device, self.world_size, epoch=epoch, steps_per_epoch=self.steps_per_epoch,
                           start_step=start_step, progress=o.progress)
        result = EpochResult(epoch, start_step, float("nan"))
        data = iter(loader)
        for step_in_epoch in range(start_step, self.steps_per_epoch):
            step = epoch * self.steps_per_epoch + step_in_epoch
            lr = self.set_lr(step)
            meter.step_loss.zero_()
            n, w, error = self.forward_backward(data, meter.step_loss, epoch, step_in_epoch)
            meter.throughput.add(n, w)
            if error is not None:
                result.stopped, result.error = Stop.DATA, error
                self.optimizer.zero_grad(set_to_none=True)  # the step's micro-batches are incomplete: not taken
                break
            grad_norm, found_inf = self.update()
            meter.add(found_inf)
            result.steps_done = step_in_epoch + 1
            # logged steps are fixed by the step number, so a resumed run logs the same steps
            at_log = (step_in_epoch + 1) % o.log_every == 0 or step_in_epoch == self.steps_per_epoch - 1
            if at_log:
                meter.record(hooks.log, self.skipped, epoch=epoch, step=step, lr=lr, grad_norm=grad_norm)
                if self.streak.item() >= o.max_skipped_streak:
                    result.stopped = Stop.DIVERGED
                    break
            # A signal may reach ranks at different steps: they agree through an all-reduce, which
            # costs a host sync, so with several ranks only every `stop_check_every` steps.
            if at_log or self.world_size == 1 or meter.steps % o.stop_check_every == 0:
                if self.agree_on_stop(hooks, meter, result.steps_done):
                    result.stopped = Stop.SIGNAL
                    break
        result.loss_sum, result.good_steps = meter.close()  # skipped steps added nothing to the loss sum
        result.loss = result.loss_sum / result.good_steps if result.good_steps else float("nan")
        return result
