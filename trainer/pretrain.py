"""Pre-training wiring: config -> loader, model, optimizer, schedule -> epochs -> checkpoints.

The only module that reads the config; everything it calls takes explicit arguments. Restarting
the same command resumes from the newest checkpoint in run.out_dir and continues the same
trajectory: order, augmentation, masks and drop-path noise are all derived from (seed, epoch, rank).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from simmim.pipeline import Augmentation, MaskGenerator, build_loader
from simmim.pipeline.augment import normalize, sample_seed

from .checkpoint import atomic_write, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, save_config
from .distributed import DistInfo, barrier, cleanup, init_distributed
from .engine import train_one_epoch
from .model import LossOptions, build_simmim, param_groups
from .schedule import LRSchedule
from .visualize import save_reconstruction

log = logging.getLogger("simmim")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


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


class MetricsLog:
    """run_dir/metrics.jsonl, one record per line. On resume, records past the checkpoint's step
    are dropped (atomically), so the log never holds a step twice."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        if path.exists() and keep_until_step is not None:
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line).get("step", -1) < keep_until_step]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))
        elif path.exists():
            path.unlink()

    def __call__(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def fixed_batch(loader, n: int, seed: int, masks: MaskGenerator, aug: Augmentation, device) -> tuple:
    """The same n images and masks every time, for comparable reconstruction figures."""
    ds = loader.dataset
    idx = [round(i * (len(ds) - 1) / max(1, n - 1)) for i in range(min(n, len(ds)))]
    images = torch.stack([ds[(i, sample_seed(seed, 0, i))][0] for i in idx]).to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    return normalize(images, aug.mean, aug.std), masks.sample(len(idx), generator=g, device=device)


def write_figure(model, batch, aug, path: Path, title: str) -> None:
    model.eval()
    with torch.no_grad():
        _, pred = model(*batch, return_pred=True)
    model.train()
    save_reconstruction(batch[0], batch[1], pred, aug.mean, aug.std, path, title)


def pretrain(cfg: Config) -> dict:
    d, t, o, r = cfg.data, cfg.train, cfg.optim, cfg.run
    dist: DistInfo = init_distributed(t.device)
    out_dir = Path(r.out_dir)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    setup_logging(out_dir if dist.is_main else None, dist.is_main)
    amp_dtype = amp_dtype_for(t.precision, dist.device)
    torch.manual_seed(t.seed)  # identical initial weights on every rank

    aug = Augmentation(size=d.img_size)
    masks = MaskGenerator(d.img_size, d.mask_patch_size, d.mask_ratio)
    m = cfg.model
    model = build_simmim(m.arch, d.img_size, d.mask_patch_size, m.window_size, m.drop_path,
                         LossOptions(m.loss, m.loss_beta, m.loss_all_pixels, m.norm_target),
                         m.fused_shuffle).to(dist.device)
    loader = build_loader(d.backend, d.path, aug, masks, d.batch_size, d.num_workers, dist.device,
                          dist.rank, dist.world_size, t.seed)
    ddp = model
    if dist.world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)

    global_batch = d.batch_size * dist.world_size * t.accum_steps
    lr_scale = global_batch / 512
    steps_per_epoch = len(loader) // t.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"{len(loader)} batches per epoch do not fill one step of {t.accum_steps} "
                         f"accumulation steps: lower train.accum_steps or data.batch_size")
    schedule = LRSchedule(
        lr=o.base_lr * lr_scale, warmup_lr=o.warmup_lr * lr_scale, min_lr=o.min_lr * lr_scale,
        warmup_steps=t.warmup_epochs * steps_per_epoch, total_steps=t.epochs * steps_per_epoch,
        kind=o.scheduler, milestones=tuple(m * steps_per_epoch for m in o.milestones), gamma=o.gamma)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=schedule.lr, betas=o.betas,
                                  eps=o.eps, fused=dist.device.type == "cuda")
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype is torch.float16)

    start_epoch, resumed = 0, latest_checkpoint(out_dir)
    if resumed is not None:
        state = load_checkpoint(resumed)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        log.info("resumed from %s (epoch %d done, step %d)", resumed, state["epoch"], state["step"])
    metrics = MetricsLog(out_dir / "metrics.jsonl", start_epoch * steps_per_epoch if resumed else None) \
        if dist.is_main else (lambda record: None)

    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.1fM parameters, %s, precision %s, world size %d", cfg.model.arch, n_params / 1e6,
             dist.device, {None: "fp32"}.get(amp_dtype, str(amp_dtype).removeprefix("torch.")), dist.world_size)
    log.info("data %s: %d images, %s, %d steps/epoch, global batch %d (%d x %d ranks x %d accum)",
             d.backend, len(loader.dataset), masks, steps_per_epoch, global_batch, d.batch_size,
             dist.world_size, t.accum_steps)
    log.info("lr: base %.3g -> effective %.3g (x %.4g = global batch / 512); warmup %.3g, min %.3g",
             o.base_lr, schedule.lr, lr_scale, schedule.warmup_lr, schedule.min_lr)

    vis_batch = fixed_batch(loader, 8, t.seed, masks, aug, dist.device) if dist.is_main else None
    history, start = [], time.perf_counter()
    for epoch in range(start_epoch, t.epochs):
        torch.manual_seed(t.seed * 1_000_003 + epoch * 1009 + dist.rank)  # drop path, per epoch and rank
        loader.set_epoch(epoch)
        stats = train_one_epoch(
            ddp, loader, optimizer, schedule, epoch=epoch, first_step=epoch * steps_per_epoch,
            steps=steps_per_epoch, accum_steps=t.accum_steps, clip_grad=o.clip_grad, amp_dtype=amp_dtype,
            scaler=scaler, world_size=dist.world_size, log_every=r.log_every,
            log=lambda rec: (metrics(rec), log.info(
                "epoch %d step %d  loss %.4f  lr %.3e  grad_norm %.3f  %.1f img/s", rec["epoch"], rec["step"],
                rec["loss"], rec["lr"], rec["grad_norm"], rec["img_per_s"])),
            progress=r.progress and dist.is_main and sys.stderr.isatty())
        history.append(stats)
        log.info("epoch %d done: mean loss %.4f (%.0f s elapsed)", epoch, stats["loss"], time.perf_counter() - start)
        last = epoch == t.epochs - 1
        if dist.is_main:
            metrics({"epoch": epoch, "step": (epoch + 1) * steps_per_epoch - 1, "epoch_loss": stats["loss"]})
            if (epoch + 1) % r.save_every == 0 or last:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch, "step": (epoch + 1) * steps_per_epoch,
                         "config": cfg.to_dict()}
                path = save_checkpoint(out_dir, epoch, state, r.keep_last)
                log.info("saved %s", path)
            if (epoch + 1) % r.vis_every == 0 or last:
                name = "reconstruction.png" if last else f"reconstruction-{epoch:04d}.png"
                write_figure(model, vis_batch, aug, out_dir / name, f"{cfg.model.arch}, epoch {epoch + 1}")
        barrier()
    summary = {"epochs": history, "wall_s": time.perf_counter() - start,
               "final_loss": history[-1]["loss"] if history else math.nan}
    if dist.is_main and history:
        log.info("finished %d epochs in %.1f s; run folder %s", len(history), summary["wall_s"], out_dir)
    cleanup()
    return summary
