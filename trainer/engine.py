"""One training epoch, pre-training or fine-tuning: the only place a step is written.

One path for every combination: autocast (bf16 / fp16 / off), gradient accumulation (DDP's
all-reduce or FSDP2's reduce-scatter skipped on non-final micro-steps), grad-norm clipping (over
all ranks' shards under FSDP2), a GradScaler that is a no-op unless fp16. A step whose gradient
norm is not finite is skipped on the device (the fused AdamW reads a found-inf flag), so the host
waits on the device only at log intervals, where the loss, the skipped-step count and a stop
request (preemption signal) are read.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from .distributed import all_reduce_max, all_reduce_mean
from .parallel import clip_grad_norm, sync_context


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
    stopped: str = ""  # "" | "signal" | "diverged"


def train_one_epoch(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    lr_at: Callable[[int], float], *, epoch: int, steps_per_epoch: int, start_step: int,
                    accum_steps: int, clip_grad: float, amp_dtype: torch.dtype | None,
                    scaler: torch.amp.GradScaler, state: StepState, world_size: int, log_every: int,
                    log: Callable[[dict], None], seed: int, rank: int, stop_requested: Callable[[], bool],
                    max_skipped_streak: int, stop_check_every: int = 10, progress: bool = False) -> EpochResult:
    """Runs optimizer steps start_step .. steps_per_epoch - 1 of `epoch` (each `accum_steps`
    micro-batches; the loader must already be positioned at start_step).

    Every `log_every` steps: log(record) with the step's loss (mean over ranks), lr, grad norm,
    images/sec and skipped steps; then a stop is honoured if requested on any rank, or if
    `max_skipped_streak` steps in a row were skipped (divergence).
    """
    model.train()
    device = state.device
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_sum = torch.zeros((), device=device)
    epoch_skipped = torch.zeros((), device=device)
    step_loss = torch.zeros((), device=device)
    bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch}", leave=False,
               disable=not progress, dynamic_ncols=True)
    tick, images_seen, run_steps, waited = time.perf_counter(), 0, 0, 0.0
    result = EpochResult(epoch, start_step, float("nan"))
    data = iter(loader)
    for step_in_epoch in range(start_step, steps_per_epoch):
        step = epoch * steps_per_epoch + step_in_epoch
        torch.manual_seed(seed * 1_000_003 + step * 1009 + rank)  # drop path: a function of (step, rank)
        lr = lr_at(step)
        for group in optimizer.param_groups:  # set from the schedule each step: a scale applies once
            group["lr"] = lr * group.get("lr_scale", 1.0)
        step_loss.zero_()
        for micro in range(accum_steps):
            t0 = time.perf_counter()
            batch = next(data)  # (images, masks) for SimMIM, (images, labels) for fine-tuning
            waited += time.perf_counter() - t0  # host time blocked on the loader
            last = micro == accum_steps - 1
            with sync_context(model, last):
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss = model(*batch)
                scaler.scale(loss / accum_steps).backward()
            step_loss += loss.detach() / accum_steps
            images_seen += batch[0].shape[0]
        scaler.unscale_(optimizer)
        grad_norm = clip_grad_norm(params, clip_grad if clip_grad > 0 else float("inf"))
        found_inf = (~torch.isfinite(grad_norm)).float()
        if scaler.is_enabled():
            scaler.step(optimizer)  # fp16: the scaler skips non-finite steps itself
        else:
            optimizer.found_inf = found_inf  # read by the fused AdamW: no update, no host sync
            optimizer.step()
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.skipped += found_inf
        epoch_skipped += found_inf
        state.streak = (state.streak + found_inf) * found_inf
        loss_sum += torch.where(found_inf > 0, 0.0, step_loss)
        run_steps += 1
        result.steps_done = step_in_epoch + 1
        bar.update(1)
        at_log = run_steps % log_every == 0 or step_in_epoch == steps_per_epoch - 1
        if at_log:
            mean_loss = all_reduce_mean(step_loss).item()  # host sync, at log intervals only
            elapsed = time.perf_counter() - tick
            record = {"epoch": epoch, "step": step, "loss": mean_loss, "lr": lr,
                      "grad_norm": float(grad_norm), "img_per_s": images_seen * world_size / elapsed,
                      "data_wait": waited / elapsed,
                      "skipped_steps": int(state.skipped.item())}
            log(record)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}")
            tick, images_seen, waited = time.perf_counter(), 0, 0.0
            if state.streak.item() >= max_skipped_streak:
                result.stopped = "diverged"
                break
        # A signal may reach ranks at different steps: they agree through an all-reduce, which
        # costs a host sync, so with several ranks only every `stop_check_every` steps.
        if (at_log or world_size == 1 or run_steps % stop_check_every == 0) and \
                all_reduce_max(float(stop_requested()), device) > 0:
            result.stopped = "signal"
            break
    bar.close()
    good_steps = run_steps - int(epoch_skipped.item())  # skipped steps added nothing to loss_sum
    result.loss = all_reduce_mean(loss_sum).item() / good_steps if good_steps else float("nan")
    return result
