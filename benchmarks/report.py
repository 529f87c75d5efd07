"""Shared output helpers: results folders that name the device, and grouped bar charts."""
from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import torch

from simmim.core.io import atomic_write


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def results_dir(base: str | Path, name: str) -> Path:
    """base/<name>-<device>, e.g. results/kernels-nvidia-h100-80gb-hbm3."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")
    out = Path(base) / f"{name}-{slug}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """Writes text to path through a temporary file and a rename: a reader (or an archive taken
    while a benchmark runs, or after it was killed) sees the old file or the new, never a torn one."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_results(out: Path, stem: str, report: str, result: dict) -> None:
    """out/stem.md and out/stem.json, each atomically. Benchmarks call it after every model, op or
    method, so a run stopped at a time limit leaves what it finished."""
    write_text_atomic(out / f"{stem}.md", report)
    write_text_atomic(out / f"{stem}.json", json.dumps(result, indent=1))


def write_bar_chart(path: Path, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    n = len(series)
    width = 0.8 / n
    fig = Figure(figsize=(max(6, 1.6 * len(groups)), 4))
    ax = fig.subplots()
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
