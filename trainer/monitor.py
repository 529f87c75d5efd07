"""Watching a run: TensorBoard events (W&B optionally), `curves.png`, and `simmim plot` to compare runs.

Only rank 0 writes, and what it writes here is what a run can do without: a TensorBoard, W&B,
metrics.jsonl or figure write that fails (a full disk, a folder made read-only mid-run) is one
warning (`RunMonitor.soft`), and training goes on; only a checkpoint that cannot be written ends a
run. Scalars arrive as the records the epoch loop already logs at `run.log_every`
(values already on the host: the monitor adds no device sync to the step), per-epoch records and
the validation loss at epoch ends, and the reconstruction figure as an image. Events are flushed at
each log record, so TensorBoard shows a run live:

    tensorboard --logdir runs/

The curves (loss of the logged steps, epoch means and validation loss; lr) are drawn from the run's
`metrics.jsonl`, so a resumed run's figure covers the whole run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
from PIL import Image

from simmim.core.errors import UserError

from .visualize import save_png

log = logging.getLogger("simmim")
T = TypeVar("T")

# scalar tags: metrics.jsonl key -> TensorBoard tag
STEP_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "img_per_s": "perf/img_per_s",
             "data_wait": "perf/data_wait_share", "skipped_steps": "train/skipped_steps"}
EPOCH_TAGS = {"epoch_loss": "train/epoch_loss", "val_loss": "val/loss", "top1": "val/top1", "top5": "val/top5",
              "knn_top1": "val/knn_top1"}


class RunMonitor:
    """TensorBoard (and optionally W&B) for one run folder; a no-op on ranks other than 0.

    log(record): a metrics.jsonl record {"step": int, ...}; known keys (STEP_TAGS, EPOCH_TAGS) become
    scalars at that step. image(tag, png_path, step): a PNG written by the run (the reconstruction).
    """

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = True, wandb: bool = False,
                 config: dict | None = None, resume_step: int | None = None):
        self.writer = self.wandb = None
        self.failing: set[str] = set()  # outputs whose last write failed (warned once until one works)
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events a killed run wrote past its last checkpoint,
            # which the resumed run writes again
            self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=resume_step,
                                        flush_secs=60)
        if wandb:
            self.wandb = _start_wandb(out_dir, config or {}, resume_step is not None)

    def soft(self, what: str, write: Callable[[], T]) -> T | None:
        """`write()`, an output the run can do without; an OSError (a full disk, a folder made
        read-only) is one warning naming `what` (again only after a write of it has worked) and
        None, never the end of the run."""
        try:
            result = write()
        except OSError as e:
            if what not in self.failing:
                self.failing.add(what)
                log.warning("cannot write %s (%s%s): training goes on without it; free space in (or fix the "
                            "permissions of) the run folder", what, e.strerror or e,
                            f": '{e.filename}'" if e.filename else "")
            return None
        self.failing.discard(what)
        return result

    def log(self, record: dict) -> None:
        step = record.get("step")
        if step is None:
            return
        scalars = {tag: record[k] for k, tag in {**STEP_TAGS, **EPOCH_TAGS}.items()
                   if isinstance(record.get(k), (int, float)) and math.isfinite(record[k])}
        if self.writer is not None:
            self.soft("TensorBoard events", lambda: self._add_scalars(scalars, step))
        if self.wandb is not None and scalars:
            self.soft("W&B records", lambda: self.wandb.log(scalars, step=step))

    def _add_scalars(self, scalars: dict, step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def image(self, tag: str, png: Path, step: int) -> None:
        if self.writer is None and self.wandb is None:
            return
        self.soft(f"TensorBoard image {tag}", lambda: self._image(tag, png, step))

    def _image(self, tag: str, png: Path, step: int) -> None:
        with Image.open(png) as img:
            array = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
        if self.writer is not None:
            self.writer.add_image(tag, array, step, dataformats="HWC")
            self.writer.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(array)}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.soft("TensorBoard events", self.writer.close)
        if self.wandb is not None:
            self.soft("W&B records", self.wandb.finish)


def _start_wandb(out_dir: Path, config: dict, resume: bool):
    """A W&B run in `out_dir/wandb` (offline with WANDB_MODE=offline: no network needed)."""
    try:
        import wandb
    except ImportError:
        log.warning("run.wandb=true but wandb is not installed (pip install wandb): logging to TensorBoard only")
        return None
    return wandb.init(dir=os.environ.get("WANDB_DIR", str(out_dir)), config=config, name=Path(out_dir).name, resume="allow" if resume else None,
                      id=_wandb_id(out_dir))


def _wandb_id(out_dir: Path) -> str:
    """One W&B run id per run folder, kept in the folder, so a resumed run continues its W&B run."""
    path = Path(out_dir) / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


# ---------------------------------------------------------------- curves

def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl (a torn last line, from a killed run, is ignored).
    Raises FileNotFoundError when the file is missing."""
    records = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(runs: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Loss (logged steps faint, epoch means and validation loss bold) and lr against the optimizer
    step, one colour per run, written atomically as PNG. `runs`: label -> metrics records."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry


    fig = Figure(figsize=(11, 4))
    ax_loss, ax_lr = fig.subplots(1, 2)
    ax_knn = None  # a right-hand axis for the k-NN top-1, beside the validation loss
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        steps, loss = _series(records, "loss")
        ax_loss.plot(steps, loss, color=color, alpha=0.3, lw=0.8)
        steps, loss = _series(records, "epoch_loss")
        ax_loss.plot(steps, loss, color=color, marker="o", ms=3, label=f"{label} train (epoch mean)")
        steps, loss = _series(records, "val_loss")
        if steps:
            ax_loss.plot(steps, loss, color=color, ls="--", marker="s", ms=3, label=f"{label} validation")
        steps, knn = _series(records, "knn_top1")
        if steps:
            ax_knn = ax_knn or ax_loss.twinx()
            ax_knn.plot(steps, knn, color=color, ls=":", marker="^", ms=3, label=f"{label} k-NN top-1 (%)")
        steps, lr = _series(records, "lr")
        ax_lr.plot(steps, lr, color=color, label=label)
    ax_loss.set(xlabel="optimizer step", ylabel="masked loss", title="loss")
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    if ax_knn is not None:
        ax_knn.set_ylabel("k-NN top-1 (%)")
        ax_knn.legend(fontsize=7, loc="upper center")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save_png(fig, path, title)


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """`simmim plot RUN [RUN ...] --out PNG`: the runs' curves overlaid in one figure.
    Raises UserError naming a folder without metrics.jsonl."""
    runs = {}
    for run in run_dirs:
        run = Path(run)
        if not (run / "metrics.jsonl").is_file():
            raise UserError(f"'{run}' holds no metrics.jsonl: pass run folders written by simmim pretrain / finetune")
        label = run.name if run.name not in runs else str(run)
        runs[label] = read_metrics(run)
    return plot_curves(runs, out, title=" vs ".join(runs))
