"""Pre-training wiring: config -> loader, model, optimizer, schedule -> epochs -> checkpoints.

The only module that reads the config; everything it calls takes explicit arguments. Restarting
the same command resumes from the newest checkpoint in run.out_dir, mid-epoch if that is where
it stopped, and continues the same trajectory: order, augmentation, masks and drop-path noise are
all functions of (seed, epoch, step, rank), never of how the run got there.

SIGTERM / SIGUSR1 (preemption, a scheduler's time limit): the current step finishes, a checkpoint
is written and the process exits with REQUEUE_EXIT, which trainer/run.sh turns into a requeue.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from simmim.pipeline import Augmentation, MaskGenerator, build_loader
from simmim.pipeline.augment import normalize
from simmim.pipeline.seeding import derive_seed, torch_generator
from simmim.pipeline.loaders import BACKEND_OPTIONS

from .checkpoint import atomic_write, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, save_config
from .distributed import DistInfo, barrier, cleanup, init_distributed
from .engine import StepState, train_one_epoch
from .model import LossOptions, build_simmim, param_groups
from .schedule import LRSchedule
from .visualize import save_reconstruction

log = logging.getLogger("simmim")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
REQUEUE_EXIT = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; run again to continue


class Preempted(Exception):
    """Stopped by a signal after writing a checkpoint."""


class Diverged(Exception):
    """Too many consecutive non-finite steps."""


def setup_logging(out_dir: Path | None, is_main: bool) -> None:
    handlers: list[logging.Handler] = []
    if is_main:
        handlers.append(logging.StreamHandler(sys.stdout))
        if out_dir is not None:
            handlers.append(logging.FileHandler(out_dir / "log.txt"))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=handlers or None,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)


def amp_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be auto, bf16, fp16 or fp32, got '{precision}'")
    return PRECISIONS[precision]


class StopFlag:
    """Set by SIGTERM / SIGUSR1; the training loop polls it."""

    def __init__(self):
        self.signum = 0
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: stop now, without a checkpoint
            raise SystemExit(128 + signum)
        log.warning("received %s: stopping after the current step with a checkpoint (send it again "
                    "to stop at once)", signal.Signals(signum).name)
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum != 0


class MetricsLog:
    """run_dir/metrics.jsonl, one record per line. On resume, records at or past the resumed
    step are dropped (atomically), so the log never holds a step twice."""

    def __init__(self, path: Path, keep_before_step: int | None):
        self.path = path
        if path.exists() and keep_before_step is not None:
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line).get("step", -1) < keep_before_step]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))
        elif path.exists():
            path.unlink()

    def __call__(self, record: dict) -> None:
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def loader_options(d) -> dict:
    """The `data.*` keys that are backend options (see `pipeline.loaders`), for `build_loader`."""
    return {f.name: getattr(d, f.name) for f in dataclasses.fields(d) if f.name in BACKEND_OPTIONS}


def fixed_batch(loader, n: int, seed: int, masks: MaskGenerator, aug: Augmentation, device) -> tuple:
    """The same n images and masks every time, for comparable reconstruction figures (loaders
    that augment inside a compiled pipeline give the first images of epoch 0 instead)."""
    if not hasattr(loader, "dataset"):
        loader.set_epoch(0)
        images, batch_masks = next(iter(loader))[:2]
        return images[:n].clone(), batch_masks[:n].clone()
    ds = loader.dataset
    idx = [round(i * (len(ds) - 1) / max(1, n - 1)) for i in range(min(n, len(ds)))]
    images = torch.stack([ds[(i, derive_seed("sample", seed, 0, i))][0] for i in idx]).to(device)
    g = torch_generator("figure", seed, device=device)
    return normalize(images, aug.mean, aug.std), masks.sample(len(idx), generator=g, device=device)


def write_figure(model, batch, aug, path: Path, title: str) -> None:
    model.eval()
    with torch.no_grad():
        _, pred = model(*batch, return_pred=True)
    model.train()
    save_reconstruction(batch[0], batch[1], pred, aug.mean, aug.std, path, title)


def resolve_accumulation(state: dict | None, batch_size: int, world: int, accum: int) -> int:
    """Keeps a resumed run's global batch when the world size changed, through accumulation;
    if that cannot be done exactly, says what changes."""
    if state is None or state["global_batch"] == batch_size * world * accum:
        return accum
    old = state["global_batch"]
    if old % (batch_size * world) == 0:
        new_accum = old // (batch_size * world)
        log.warning("world size %d -> %d: train.accum_steps %d -> %d keeps the global batch at %d",
                    state["world_size"], world, accum, new_accum, old)
        return new_accum
    log.warning("world size %d -> %d: the global batch changes from %d to %d (%d is not a multiple of "
                "%d x %d ranks); the lr is rescaled to the new batch and the schedule to the new "
                "steps per epoch", state["world_size"], world, old, batch_size * world * accum, old,
                batch_size, world)
    return accum


class PretrainTask:
    """SimMIM: the masked-image model, the (images, masks) loader, reconstruction figures."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        d = cfg.data
        self.aug = Augmentation(size=d.img_size)
        self.masks = MaskGenerator(d.img_size, d.mask_patch_size, d.mask_ratio)

    def build(self, dist: DistInfo):
        d, m, t = self.cfg.data, self.cfg.model, self.cfg.train
        model = build_simmim(m.arch, d.img_size, d.mask_patch_size, m.window_size, m.drop_path,
                             LossOptions(m.loss, m.loss_beta, m.loss_all_pixels, m.norm_target),
                             m.fused_shuffle).to(dist.device)
        loader = build_loader(d.backend, d.path, self.aug, self.masks, d.batch_size, d.num_workers, dist.device,
                              dist.rank, dist.world_size, t.seed, **loader_options(d))
        return model, loader

    def param_groups(self, model) -> list[dict]:
        return param_groups(model, self.cfg.optim.weight_decay)

    def describe_data(self) -> str:
        return str(self.masks)

    def prepare(self, model, loader, dist: DistInfo) -> None:
        self.vis_batch = fixed_batch(loader, 8, self.cfg.train.seed, self.masks, self.aug, dist.device) \
            if dist.is_main else None

    def after_epoch(self, model, epoch: int, last: bool, out_dir: Path, dist: DistInfo, amp_dtype) -> dict:
        if dist.is_main and ((epoch + 1) % self.cfg.run.vis_every == 0 or last):
            name = "reconstruction.png" if last else f"reconstruction-{epoch:04d}.png"
            write_figure(model, self.vis_batch, self.aug, out_dir / name, f"{self.cfg.model.arch}, epoch {epoch + 1}")
        return {}


def pretrain(cfg: Config) -> dict:
    """SimMIM pre-training (see the module docstring)."""
    return fit(cfg, PretrainTask(cfg))


def fit(cfg: Config, task) -> dict:
    """The training run shared by pre-training and fine-tuning: distributed set-up, resume,
    schedule, epochs, checkpoints, stop signals. `task` builds the model and loader, gives the
    parameter groups and runs its own end-of-epoch work (figures, evaluation)."""
    d, t, o, r, m = cfg.data, cfg.train, cfg.optim, cfg.run, cfg.model
    dist: DistInfo = init_distributed(t.device)
    out_dir = Path(r.out_dir)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    setup_logging(out_dir if dist.is_main else None, dist.is_main)
    amp_dtype = amp_dtype_for(t.precision, dist.device)
    torch.manual_seed(t.seed)  # identical initial weights on every rank

    model, loader = task.build(dist)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if t.channels_last and dist.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    resumed = latest_checkpoint(out_dir)
    state = load_checkpoint(resumed) if resumed is not None else None
    accum = resolve_accumulation(state, d.batch_size, dist.world_size, t.accum_steps)
    global_batch = d.batch_size * dist.world_size * accum
    lr_scale = global_batch / 512
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(loader)} batches per epoch do not fill one step of {accum} "
                         f"accumulation steps: lower train.accum_steps or data.batch_size")
    schedule = LRSchedule(
        lr=o.base_lr * lr_scale, warmup_lr=o.warmup_lr * lr_scale, min_lr=o.min_lr * lr_scale,
        warmup_steps=t.warmup_epochs * steps_per_epoch, total_steps=t.epochs * steps_per_epoch,
        kind=o.scheduler, milestones=tuple(e * steps_per_epoch for e in o.milestones), gamma=o.gamma)
    optimizer = torch.optim.AdamW(task.param_groups(model), lr=schedule.lr, betas=o.betas,
                                  eps=o.eps, fused=True)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype is torch.float16)
    step_state = StepState(dist.device)

    epoch, start_step = 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step_state.skipped += state.get("skipped_steps", 0)
        epoch, start_step = state["epoch"], min(state["step_in_epoch"], steps_per_epoch)
        if start_step == steps_per_epoch:
            epoch, start_step = epoch + 1, 0
        log.info("resumed from %s: epoch %d, step %d of %d", resumed, epoch, start_step, steps_per_epoch)
    metrics = MetricsLog(out_dir / "metrics.jsonl", epoch * steps_per_epoch + start_step if state else None) \
        if dist.is_main else (lambda record: None)

    train_model = model
    if dist.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if t.compile:
        train_model = torch.compile(train_model)

    task.prepare(model, loader, dist)  # work that needs the built loader (pre-training's figure batch)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.1fM parameters, %s, precision %s, world size %d%s%s", m.arch, n_params / 1e6,
             dist.device, {None: "fp32"}.get(amp_dtype, str(amp_dtype).removeprefix("torch.")), dist.world_size,
             ", compiled" if t.compile else "", ", activation checkpointing" if t.grad_checkpointing else "")
    log.info("data %s: %d images, %s, %d steps/epoch, global batch %d (%d x %d ranks x %d accum)",
             d.backend, loader.num_samples, task.describe_data(), steps_per_epoch, global_batch, d.batch_size,
             dist.world_size, accum)
    log.info("lr: base %.3g -> effective %.3g (x %.4g = global batch / 512); warmup %.3g, min %.3g",
             o.base_lr, schedule.lr, lr_scale, schedule.warmup_lr, schedule.min_lr)

    def checkpoint(ep: int, step_in_epoch: int) -> Path | None:
        if not dist.is_main:
            return None
        s = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "epoch": ep, "step_in_epoch": step_in_epoch,
             "global_batch": global_batch, "world_size": dist.world_size,
             "skipped_steps": int(step_state.skipped.item()), "config": cfg.to_dict()}
        path = save_checkpoint(out_dir, ep * steps_per_epoch + step_in_epoch, s, r.keep_last)
        log.info("saved %s", path)
        return path

    stop = StopFlag()
    history, start = [], time.perf_counter()
    for epoch in range(epoch, t.epochs):
        loader.set_accum_steps(accum)  # masks are drawn per optimizer step's global batch
        loader.set_epoch(epoch, start_step * accum)
        res = train_one_epoch(
            train_model, loader, optimizer, schedule, epoch=epoch, steps_per_epoch=steps_per_epoch,
            start_step=start_step, accum_steps=accum, clip_grad=o.clip_grad, amp_dtype=amp_dtype, scaler=scaler,
            state=step_state, world_size=dist.world_size, log_every=r.log_every,
            log=lambda rec: (metrics(rec), log.info(
                "epoch %d step %d  loss %.4f  lr %.3e  grad_norm %.3f  %.1f img/s%s", rec["epoch"], rec["step"],
                rec["loss"], rec["lr"], rec["grad_norm"], rec["img_per_s"],
                f"  skipped {rec['skipped_steps']}" if rec["skipped_steps"] else "")),
            seed=t.seed, rank=dist.rank, stop_requested=stop, max_skipped_streak=t.max_skipped_steps,
            stop_check_every=r.stop_check_every, progress=r.progress and dist.is_main and sys.stderr.isatty())
        start_step = 0
        if res.stopped == "diverged":
            # skipped steps leave the weights untouched: these are the weights from before the divergence
            path = checkpoint(epoch, res.steps_done)
            barrier()
            cleanup()
            raise Diverged(f"{t.max_skipped_steps} consecutive steps had a non-finite loss or gradient "
                           f"(epoch {epoch}); the weights from before are in {path or out_dir}: lower "
                           f"optim.base_lr or raise train.max_skipped_steps")
        if res.stopped == "signal":
            checkpoint(epoch, res.steps_done)
            barrier()
            cleanup()
            raise Preempted(f"stopped by {signal.Signals(stop.signum).name if stop.signum else 'a signal'} "
                            f"at epoch {epoch}, step {res.steps_done}: run the same command to resume")
        last = epoch == t.epochs - 1
        extra = task.after_epoch(model, epoch, last, out_dir, dist, amp_dtype)
        history.append({"epoch": epoch, "loss": res.loss, "steps": steps_per_epoch, **extra})
        log.info("epoch %d done: mean loss %.4f%s (%.0f s elapsed)", epoch, res.loss,
                 "".join(f", {k} {v:.4g}" for k, v in extra.items()), time.perf_counter() - start)
        if dist.is_main:
            metrics({"epoch": epoch, "step": (epoch + 1) * steps_per_epoch - 1, "epoch_loss": res.loss, **extra})
            if (epoch + 1) % r.save_every == 0 or last:
                checkpoint(epoch, steps_per_epoch)
        barrier()
    summary = {"epochs": history, "wall_s": time.perf_counter() - start,
               "final_loss": history[-1]["loss"] if history else math.nan,
               **({k: v for k, v in history[-1].items() if k not in ("epoch", "loss", "steps")} if history else {})}
    if history:
        log.info("finished %d epochs in %.1f s; run folder %s", len(history), summary["wall_s"], out_dir)
    cleanup()
    return summary
