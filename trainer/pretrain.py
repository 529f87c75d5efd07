"""SimMIM pre-training: the `Task` that `loop.fit` trains.

The masked-image model, the (images, masks) loader, and reconstruction figures of a fixed batch.
The run itself (resume, schedule, checkpoints, signals) is `loop.fit`'s.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from simmim.pipeline import Augmentation, LoaderSpec, MaskGenerator, build_loader
from simmim.pipeline.stats import normalization

from .checkpoint import all_checkpoints
from .config import PretrainConfig
from .distributed import DistInfo, all_reduce_sum
from .finetune import load_pretrained
from .knn import KNNMonitor
from .loop import fit
from .model import ARCHS, build_simmim, param_groups
from .parallel import is_fsdp, lockstep
from .precision import autocast
from .visualize import save_reconstruction

log = logging.getLogger("simmim")


@torch.no_grad()
def validation_loss(model, loader, amp_dtype: torch.dtype | None) -> float:
    """The masked loss over the whole held-out set, summed over ranks: the mean of the per-batch
    losses weighted by batch size (every image has the same number of masked cells, so this is the
    loss over all masked pixels). Masks are the loader's epoch-0 masks and the view is the evaluation
    view (resize + centre crop), so every call sees the same inputs and runs compare on one number."""
    model.eval()
    loader.set_epoch(0)
    total = None
    device = next(model.parameters()).device
    for (images, masks), real in lockstep(loader, model, device):  # FSDP2: the same forwards on every rank
        with autocast(images.device.type, amp_dtype):
            loss = model(images, masks)
        if not real:
            continue
        part = torch.stack([loss.detach().float() * images.shape[0], torch.tensor(float(images.shape[0]),
                                                                                  device=images.device)])
        total = part if total is None else total + part
    model.train()
    total = all_reduce_sum(total)  # every rank has at least one batch (drop_last=False keeps remainders)
    return (total[0] / total[1]).item()


def write_figure(model, batch, aug, path: Path, title: str, save: bool = True) -> None:
    """Reconstructs `batch` and saves the figure if `save` (a sharded model needs every rank in
    its forward, and only one of them to save)."""
    model.eval()
    with torch.no_grad():
        _, pred = model(*batch, return_pred=True)
    model.train()
    if save:
        save_reconstruction(batch[0], batch[1], pred, aug.mean, aug.std, path, title)


def init_from(model, path: str, arch: str, resuming: Path | None) -> None:
    """Continued pre-training: the encoder of `model` (a SimMIM model of `arch`, on the CPU) gets
    the encoder weights of `path` (anything `read_checkpoint` reads: this project's checkpoint file
    or DCP folder, microsoft/SimMIM's, a `simmim export` folder), adapted as fine-tuning adapts them
    (`finetune.load_pretrained`: relative-position tables resized to this image size and window);
    the mask token and prediction head start fresh, and so do the optimizer and schedule. Logs the
    missing and unexpected keys in one line, and the patch embedding's adaptation when the checkpoint
    has another channel count (RGB or grey to data.channels: `finetune.adapt_channels`).
    CheckpointError (one line) for another family, patch size, channel count it cannot adapt, or a
    table it cannot resize. A resume (`resuming`: its checkpoint) reads nothing: the
    run's own checkpoint holds the weights."""
    if resuming is not None:
        log.info("model.init_from %s not read: resuming from %s, which holds the run's own weights", path, resuming)
        return
    path = path.removeprefix("local-dir:")  # timm's name for an exported folder
    encoder = model.encoder.swin if hasattr(model.encoder, "swin") else model.encoder.vit
    report = load_pretrained(encoder, path, arch, key="model.init_from")
    for note in report["notes"]:
        log.info("model.init_from: %s", note)
    log.info("model.init_from %s (%s layout): encoder loaded, mask token and head fresh; %d missing keys %s, "
             "%d unexpected %s, resized %s%s", path, report["layout"], len(report["missing"]), report["missing"],
             len(report["unexpected"]), report["unexpected"], report["resized"],
             f"; {report['adapted']}" if report["adapted"] else "")


class PretrainTask:
    """SimMIM: the masked-image model, the (images, masks) loader, reconstruction figures."""

    batch_transform = None  # (images, masks) go to the model as the loader yields them
    resuming = None  # set by loop.setup_run

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        d = cfg.data
        mean, std, source = normalization(d.channels, d.mean, d.std, d.path)
        self.normalization = (f"{d.channels} channel{'s' * (d.channels != 1)} normalised by {source} mean "
                              f"{[round(v, 4) for v in mean]} std {[round(v, 4) for v in std]}")
        self.aug = Augmentation(size=d.img_size, mean=mean, std=std)
        self.masks = MaskGenerator(d.img_size, d.mask_patch_size, d.mask_ratio, d.mask_strategy)

    def build(self, dist: DistInfo):
        d, m, t = self.cfg.data, self.cfg.model, self.cfg.train
        model = build_simmim(m.arch, d.img_size, d.mask_patch_size, m.window_size, m.drop_path, self.cfg.loss,
                             m.fused_shuffle, m.head, in_chans=d.channels, mean=self.aug.mean, std=self.aug.std)
        if m.init_from:
            init_from(model, m.init_from, m.arch, self.resuming)
        model = model.to(dist.device)
        where = (dist.device, dist.rank, dist.world_size, t.seed)
        loader = build_loader(LoaderSpec.from_config(d, self.aug), self.masks, *where)
        self.val_loader = None
        if d.val_path and self.cfg.run.val_every > 0:  # found by `inputs` before the run folder is written
            # fixed masks (epoch 0's) and the evaluation view: the same inputs at every validation
            spec = LoaderSpec.from_config(d, self.aug, d.val_path, train=False, drop_last=False)
            self.val_loader = build_loader(spec, self.masks, *where)
        self.knn = self.knn_monitor(dist)
        return model, loader

    def knn_monitor(self, dist: DistInfo) -> KNNMonitor | None:
        """The k-NN monitor run.knn_every asks for, or None, with a warning from rank 0 naming what it
        needs, where it cannot run: a recipe's monitor (the demo's) must not stop a run told to train
        without held-out images, or from FFCV .beton files or stream shards (the monitor reads image files)."""
        d, r, m = self.cfg.data, self.cfg.run, self.cfg.model
        if r.knn_every <= 0:
            return None
        if not d.val_path or d.backend in ("ffcv", "stream"):
            if dist.is_main:
                log.warning("run.knn_every=%d: no k-NN evaluation, %s (set run.knn_every=0 to silence this)",
                            r.knn_every, "data.val_path is empty" if not d.val_path else
                            "it reads image files (class folders or a `path label` list) through the torch loader, "
                            f"and data.backend={d.backend} gives it {'.beton files' if d.backend == 'ffcv' else 'shards'} "
                            f"({d.path}, {d.val_path})")
            return None
        return KNNMonitor(d.path, d.val_path, d.img_size, ARCHS[m.arch].patch_size, r.knn_train_samples,
                          d.batch_size, d.num_workers, self.cfg.train.seed, dist, self.aug, d.channels)

    def param_groups(self, model) -> list[dict]:
        o, arch = self.cfg.optim, ARCHS[self.cfg.model.arch]
        return param_groups(model, o.weight_decay, arch.family, o.weight_decay_rule)

    def describe_data(self) -> str:
        return f"{self.normalization}, {self.masks}"

    def checkpoint_extra(self) -> dict:
        """The normalisation the run used (data.mean / data.std, a statistics file or ImageNet's), so
        reconstruct and export show and describe the images as they were: `CheckpointContents.normalization`."""
        return {"normalization": {"channels": self.cfg.data.channels, "mean": list(self.aug.mean),
                                  "std": list(self.aug.std)}}

    def inputs(self) -> dict[str, tuple[str, str]]:
        d = self.cfg.data
        make = {"ffcv": f"write it from class folders or a list with `simmim convert SRC {d.path}`",
                "stream": f"write shards from class folders or a list with `simmim shard SRC {d.path}`"}.get(
            d.backend, "build the sample set with `simmim sample-data`, or set data.path")
        # a resume reads the run's own checkpoint, not model.init_from: its source may be gone (a
        # fresh start whose run folder's checkpoints are all unreadable finds a missing one in `build`)
        init = "" if all_checkpoints(self.cfg.run.out_dir) else self.cfg.model.init_from.removeprefix("local-dir:")
        return {"model.init_from": (init, "point it at a SimMIM checkpoint or an exported "
                                                              "encoder, or set model.init_from= (empty)"),
                "data.path": (d.path, make),
                "data.val_path": (d.val_path if self.cfg.run.val_every > 0 or self.cfg.run.knn_every > 0 else "",
                                  "point it at held-out images, or set data.val_path= (empty) to train "
                                  "without a validation loss")}

    def prepare(self, model, loader, dist: DistInfo) -> None:
        self.every_rank = is_fsdp(model)  # a sharded forward needs every rank
        self.vis_batch = loader.preview_batch(8) if dist.is_main or self.every_rank else None

    def after_epoch(self, model, epoch: int, last: bool, out_dir: Path, dist: DistInfo, amp_dtype) -> dict:
        out = {}
        r = self.cfg.run
        if self.val_loader is not None and ((epoch + 1) % r.val_every == 0 or last):
            out["val_loss"] = validation_loss(model, self.val_loader, amp_dtype)  # every rank takes part
        if self.knn is not None and ((epoch + 1) % r.knn_every == 0 or last):
            out["knn_top1"] = self.knn(model, amp_dtype)  # every rank takes part
        if (dist.is_main or self.every_rank) and ((epoch + 1) % r.vis_every == 0 or last):
            name = "reconstruction.png" if last else f"reconstruction-{epoch:04d}.png"
            try:
                write_figure(model, self.vis_batch, self.aug, out_dir / name,
                             f"{self.cfg.model.arch}, epoch {epoch + 1}", save=dist.is_main)
            except OSError as e:  # a figure is not worth the run (a full disk, a folder made read-only)
                log.warning("cannot write %s (%s): training goes on without it", out_dir / name, e.strerror or e)
                return out
            if dist.is_main:  # a recipe's monitor (the demo's) must not stop a run told to train without held-out images
                out["reconstruction"] = out_dir / name
        return out


def pretrain(cfg: PretrainConfig) -> dict:
    """SimMIM pre-training (see the module docstring)."""
    return fit(cfg, PretrainTask(cfg))
