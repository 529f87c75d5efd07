"""One training epoch, pre-training or fine-tuning: the only place a step is written.

One path for every combination: autocast (bf16 / fp16 / off), gradient accumulation (DDP's
all-reduce or FSDP2's reduce-scatter skipped on non-final micro-steps), grad-norm clipping (over
all ranks' shards under FSDP2), a GradScaler that is a no-op unless fp16. A step whose gradient
norm is not finite is skipped on the device (the fused AdamW reads a found-inf flag, through
`compat.skip_nonfinite_step`; other optimizers read it on the host), so the host waits on the
device only at log intervals, where the loss, the skipped-step count and a stop request
(preemption signal) are read.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from simmim.pipeline.errors import DatasetError
from simmim.pipeline.seeding import keyed_rng

from .compat import skip_nonfinite_step
from .distributed import all_reduce_mean, any_rank, host_any
from .precision import autocast
from .parallel import clip_grad_norm, sync_context

# A task's transform of a whole batch before the forward, e.g. (images, labels) -> (images, targets)
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class StepState:
    """Device-side counters carried across epochs; read only at sync points."""

    def __init__(self, device: torch.device):
        self.device = device
        self.skipped = torch.zeros((), device=device)  # steps skipped for a non-finite gradient, in total
        self.streak = torch.zeros((), device=device)  # consecutive skipped steps up to now


@dataclass
class EpochResult:
    epoch: int
    steps_done: int  # optimizer steps of this epoch completed (from step 0 of the epoch)
    loss: float  # mean over the steps run in this call, over ranks
    loss_sum: float = 0.0  # sum of the finite steps' losses run in this call (mean over ranks)
    good_steps: int = 0  # steps run in this call that were not skipped
    stopped: str = ""  # "" | "signal" | "diverged" | "data" (the loader raised `error`)
    error: DatasetError | None = None


class PeerDataFailure(DatasetError):
    """Another rank's loader failed in this step (that rank's DatasetError names the file)."""


def forward_backward(model: torch.nn.Module, data: Iterator, scaler: torch.amp.GradScaler, step_loss: torch.Tensor,
                     *, accum_steps: int, amp_dtype: torch.dtype | None, key: tuple[int, int, int, int],
                     device: torch.device, batch_transform: BatchTransform | None = None,
                     ) -> tuple[int, float, DatasetError | None]:
    """One optimizer step's `accum_steps` micro-batches: the task's batch transform (fine-tuning:
    random erasing, mixup / cutmix), forward under autocast and the scaled backward; `step_loss`
    (a 0-d tensor) accumulates the step's mean loss on the device. The gradient all-reduce runs on
    the last micro-batch only. key = (seed, epoch, step, rank).

    Before each micro-batch's forward the ranks agree that all of them have their batch
    (`host_any`, a CPU all-reduce, no device sync), ahead of its first collective (FSDP2's
    all-gather, DDP's buffer broadcast): a rank whose loader fails stops every rank at the same
    step, and none waits in a collective for it. Returns (images, seconds the host waited on the
    loader, None, or the DatasetError that stopped the step: this rank's own, or PeerDataFailure)."""
    seed, epoch, step_in_epoch, rank = key
    images, waited = 0, 0.0
    for micro in range(accum_steps):
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
        with sync_context(model, micro == accum_steps - 1), \
                keyed_rng("step", seed, epoch, step_in_epoch, micro, rank, device=device):
            if batch_transform is not None:
                batch = batch_transform(*batch)  # (images, labels) -> (images, targets)
            with autocast(device.type, amp_dtype):
                loss = model(*batch)
            scaler.scale(loss / accum_steps).backward()
        step_loss += loss.detach() / accum_steps
        images += batch[0].shape[0]
    return images, waited, None


def update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list[torch.Tensor],
           clip_grad: float, state: StepState) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale, clip (0: no clipping), step, zero the gradients. A step whose gradient norm is not
    finite is skipped on the device and counted in `state`. Returns (grad norm, found_inf 0./1.),
    both 0-d device tensors: nothing here waits on the device."""
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(params, clip_grad if clip_grad > 0 else float("inf"))
    found_inf = (~torch.isfinite(grad_norm)).float()
    if scaler.is_enabled():
        scaler.step(optimizer)  # fp16: the scaler skips non-finite steps itself
    else:
        skip_nonfinite_step(optimizer, found_inf)  # fused AdamW: decided on the device, no host sync
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    state.skipped += found_inf
    state.streak = (state.streak + found_inf) * found_inf
    return grad_norm, found_inf


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Sets every group's lr to `lr` times its `lr_scale` (layer decay), from the schedule each
    step, so a scale applies once; returns `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


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
    """What one `train_one_epoch` call measures and shows: the current step's loss (`step_loss`,
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

    def record(self, log: Callable[[dict], None], state: StepState, *, epoch: int, step: int, lr: float,
               grad_norm: torch.Tensor) -> None:
        """log(record) for the step just taken: its loss (mean over ranks: an all-reduce and a host
        sync, so at log steps only), lr, grad norm, images/sec and share of the time waited on
        data since the last record, skipped steps in total; the bar shows loss and lr."""
        mean_loss = all_reduce_mean(self.step_loss).item()
        log({"epoch": epoch, "step": step, "loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm),
             **self.throughput.rates(), "skipped_steps": int(state.skipped.item())})
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")

    def totals(self) -> tuple[float, int]:
        """(loss sum, mean over ranks; steps not skipped): an all-reduce and a host sync."""
        return all_reduce_mean(self.loss_sum).item(), self.steps - int(self.skipped.item())

    def close(self) -> tuple[float, int]:
        """Closes the bar; returns `totals()`."""
        self.bar.close()
        return self.totals()


def agree_on_stop(stop_requested: Callable[[], bool], checkpoint_due: Callable[[], bool],
                  save: Callable[[int, float, int], None] | None, meter: EpochMeter, steps_done: int,
                  device: torch.device) -> bool:
    """True if a stop is requested on any rank (one all-reduce, on every rank). Otherwise, if a
    checkpoint is due on any rank, save(steps done, loss sum, good steps) runs on every rank."""
    stop, save_now = any_rank([stop_requested(), checkpoint_due()], device)
    if not stop and save_now and save is not None:
        save(steps_done, *meter.totals())
    return bool(stop)


def train_one_epoch(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    lr_at: Callable[[int], float], *, epoch: int, steps_per_epoch: int, start_step: int,
                    accum_steps: int, clip_grad: float, amp_dtype: torch.dtype | None,
                    scaler: torch.amp.GradScaler, state: StepState, world_size: int, log_every: int,
                    log: Callable[[dict], None], seed: int, rank: int, stop_requested: Callable[[], bool],
                    max_skipped_streak: int, stop_check_every: int = 10, progress: bool = False,
                    checkpoint_due: Callable[[], bool] = lambda: False,
                    save: Callable[[int, float, int], None] | None = None,
                    batch_transform: BatchTransform | None = None) -> EpochResult:
    """Runs optimizer steps start_step .. steps_per_epoch - 1 of `epoch` (each `accum_steps`
    micro-batches; the loader must already be positioned at start_step). `batch_transform` (the
    task's, or None) maps each micro-batch before the forward (see `forward_backward`).

    Every `log_every` steps: log(record) with the step's loss (mean over ranks), lr, grad norm,
    images/sec and skipped steps; then a stop is honoured if requested on any rank, or if
    `max_skipped_streak` steps in a row were skipped (divergence). Where ranks agree on a stop,
    they also agree on a checkpoint: if `checkpoint_due()` is true on any rank, save(steps done,
    loss sum, good steps so far this call) runs on every rank and the epoch goes on.

    A DatasetError from the loader on any rank (a file unreadable mid-run) ends the epoch on every
    rank at the last complete step (stopped "data"; `error` is this rank's DatasetError, or a
    PeerDataFailure on the other ranks).
    """
    model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    meter = EpochMeter(state.device, world_size, epoch=epoch, steps_per_epoch=steps_per_epoch, start_step=start_step,
                       progress=progress)
    result = EpochResult(epoch, start_step, float("nan"))
    data = iter(loader)
    for step_in_epoch in range(start_step, steps_per_epoch):
        step = epoch * steps_per_epoch + step_in_epoch
        lr = set_lr(optimizer, lr_at(step))
        meter.step_loss.zero_()
        n, w, error = forward_backward(model, data, scaler, meter.step_loss, accum_steps=accum_steps,
                                       amp_dtype=amp_dtype, key=(seed, epoch, step_in_epoch, rank),
                                       device=state.device, batch_transform=batch_transform)
        meter.throughput.add(n, w)
        if error is not None:
            result.stopped, result.error = "data", error
            optimizer.zero_grad(set_to_none=True)  # the step's micro-batches are incomplete: not taken
            break
        grad_norm, found_inf = update(optimizer, scaler, params, clip_grad, state)
        meter.add(found_inf)
        result.steps_done = step_in_epoch + 1
        # logged steps are fixed by the step number, so a resumed run logs the same steps
        at_log = (step_in_epoch + 1) % log_every == 0 or step_in_epoch == steps_per_epoch - 1
        if at_log:
            meter.record(log, state, epoch=epoch, step=step, lr=lr, grad_norm=grad_norm)
            if state.streak.item() >= max_skipped_streak:
                result.stopped = "diverged"
                break
        # A signal may reach ranks at different steps: they agree through an all-reduce, which
        # costs a host sync, so with several ranks only every `stop_check_every` steps.
        if at_log or world_size == 1 or meter.steps % stop_check_every == 0:
            if agree_on_stop(stop_requested, checkpoint_due, save, meter, result.steps_done, state.device):
                result.stopped = "signal"
                break
    result.loss_sum, result.good_steps = meter.close()  # skipped steps added nothing to the loss sum
    result.loss = result.loss_sum / result.good_steps if result.good_steps else float("nan")
    return result
