"""One epoch of SimMIM pre-training: the only place a step is written.

One path for every combination: autocast (bf16 / fp16 / off), gradient accumulation (DDP
all-reduce skipped on non-final micro-steps), grad-norm clipping, a GradScaler that is a no-op
unless fp16. The host waits on the device only at log intervals.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from .distributed import all_reduce_mean


def train_one_epoch(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    lr_at: Callable[[int], float], *, epoch: int, first_step: int, steps: int,
                    accum_steps: int, clip_grad: float, amp_dtype: torch.dtype | None,
                    scaler: torch.amp.GradScaler, world_size: int, log_every: int,
                    log: Callable[[dict], None], progress: bool = False) -> dict:
    """Runs `steps` optimizer steps (each `accum_steps` micro-batches) from step `first_step`.

    Calls log(record) every `log_every` steps with the step's loss (mean over ranks), lr, grad
    norm and images/sec. Returns the epoch's mean loss and step count.
    """
    model.train()
    device = next(model.parameters()).device
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_sum = torch.zeros((), device=device)
    step_loss = torch.zeros((), device=device)
    bar = tqdm(total=steps, desc=f"epoch {epoch}", leave=False, disable=not progress, dynamic_ncols=True)
    tick, images_seen = time.perf_counter(), 0
    step = first_step
    data = iter(loader)
    for i in range(steps * accum_steps):
        images, masks = next(data)
        micro = i % accum_steps
        if micro == 0:
            step = first_step + i // accum_steps
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            step_loss.zero_()
        last_micro = micro == accum_steps - 1
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = model(images, masks)
            scaler.scale(loss / accum_steps).backward()
        step_loss += loss.detach() / accum_steps
        images_seen += images.shape[0]
        if not last_micro:
            continue
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += step_loss
        bar.update(1)
        done = step - first_step + 1
        if done % log_every == 0 or done == steps:
            mean_loss = all_reduce_mean(step_loss).item()  # the only host sync in the loop
            elapsed = time.perf_counter() - tick
            record = {"epoch": epoch, "step": step, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                      "grad_norm": float(grad_norm), "img_per_s": images_seen * world_size / elapsed}
            log(record)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}")
            tick, images_seen = time.perf_counter(), 0
    bar.close()
    return {"epoch": epoch, "loss": all_reduce_mean(loss_sum / steps).item(), "steps": steps}
