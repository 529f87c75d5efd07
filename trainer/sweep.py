"""`simmim sweep`: every combination of a grid of config values as an ordinary run, and the table
of their results, laid out like the paper's ablation tables.

    simmim sweep --config demo --grid data.mask_strategy=random,block --grid data.mask_ratio=0.4,0.6 \
        [--finetune finetune_demo [--finetune-set KEY=V ...]] --out runs/sweep [KEY=V ...]

Each variant is `simmim pretrain --config RECIPE KEY=V ... <the variant's values>` with
run.out_dir=OUT/<variant>/pretrain, then (with --finetune) `simmim finetune --config FT_RECIPE`
from that run's last checkpoint into OUT/<variant>/finetune. Runs go one after another in this
process. A finished run (its last epoch's record in metrics.jsonl and a checkpoint of that
epoch) is skipped; a stopped one is started again, and resumes from its own checkpoint as any run
does. So the same command continues a sweep after a kill, and on a cluster, where each variant is
an ordinary trainer/run.sh job (`--jobs` lists them; docs/experiments.md has the SLURM array),
it gathers the table once they are done.

Outputs (atomic): OUT/results.md, results.csv, results.png: per variant its grid values, the final
training loss (last epoch's mean), the validation loss (last one logged), the fine-tuning top-1
(last epoch's, and the best), and the figures of `COLUMNS`, the hook for further evaluations.

Our own grid expansion (itertools.product) rather than Hydra's multirun: the config is already
OmegaConf with typed dataclasses, validated once by trainer/validate.py, and the CLI is argparse;
Hydra would replace both (its own app entry point, output folders and override grammar) for what is
one product here, and its sweeper neither skips finished runs nor resumes stopped ones nor writes a
table. Hydra is not a dependency of this project either.
"""
from __future__ import annotations

import csv
import io
import itertools
import math
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from simmim.core.errors import ConfigError
from simmim.core.io import atomic_write, write_text

from .checkpoint import all_checkpoints
from .config import load_config
from .finetune import finetune
from .finetune_options import FinetuneConfig
from .loop import Diverged
from .monitor import read_metrics
from .pretrain import pretrain


@dataclass(frozen=True)
class Variant:
    """One combination: `values` (key -> value text, in grid order) and its folder `name`."""
    name: str
    values: tuple[tuple[str, str], ...]

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values]


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """['data.mask_ratio=0.4,0.6', ...] -> {'data.mask_ratio': ['0.4', '0.6'], ...}; ConfigError
    for a spec without '=' or values, an empty value, or a key given twice."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key, values = key.strip(), [v.strip() for v in raw.split(",")]
        if not sep or not key or not raw or any(v == "" for v in values):
            raise ConfigError(f"--grid '{spec}' must be KEY=V1,V2,... (e.g. data.mask_ratio=0.4,0.6)")
        if key in grid:
            raise ConfigError(f"--grid names '{key}' twice: give all its values in one --grid {key}=V1,V2")
        if len(set(values)) < len(values):
            raise ConfigError(f"--grid '{spec}' repeats a value")
        grid[key] = values
    if not grid:
        raise ConfigError("simmim sweep needs at least one --grid KEY=V1,V2")
    return grid


def variant_name(values: tuple[tuple[str, str], ...]) -> str:
    """A folder name: 'mask_strategy-block_mask_ratio-0.4' (each key's last part; the whole key
    where two last parts clash), characters other than letters, digits, '.', '-' and '_' as '_'."""
    leaves = [k.rsplit(".", 1)[-1] for k, _ in values]
    names = [leaf if leaves.count(leaf) == 1 else k for leaf, (k, _) in zip(leaves, values)]
    return "_".join(re.sub(r"[^A-Za-z0-9._-]", "_", f"{n}-{v}") for n, (_, v) in zip(names, values))


def expand(grid: dict[str, list[str]]) -> list[Variant]:
    """Every combination, the last key varying fastest (as nested loops in grid order)."""
    keys = list(grid)
    combos = [tuple(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]
    return [Variant(variant_name(c), c) for c in combos]


def last_record(run_dir: Path, key: str) -> dict | None:
    """The last record of run_dir/metrics.jsonl holding `key`, or None (no file, or none holds it)."""
    try:
        records = read_metrics(run_dir)
    except FileNotFoundError:
        return None
    return next((r for r in reversed(records) if r.get(key) is not None), None)


def finished(run_dir: Path, epochs: int, key: str = "epoch_loss") -> bool:
    """Whether the run in `run_dir` logged its last epoch (`key` at epoch epochs - 1) and then
    saved a checkpoint at or after that epoch's last step (the record comes first)."""
    rec = last_record(run_dir, key)
    if rec is None or rec.get("epoch") != epochs - 1:
        return False
    found = all_checkpoints(run_dir)
    return bool(found) and found[-1][0] > rec["step"]  # checkpoint-{steps done}: the epoch's is step + 1


def _read(key: str, stage: str) -> Callable[[Path], float | None]:
    def read(variant_dir: Path) -> float | None:
        rec = last_record(variant_dir / stage, key)
        return None if rec is None else float(rec[key])
    return read


# The table's figures: (title, read(variant folder) -> value or None). Further evaluations (linear
# probe, kNN) add theirs here, reading what their command wrote into the variant's folder.
COLUMNS: list[tuple[str, Callable[[Path], float | None]]] = [
    ("train loss", _read("epoch_loss", "pretrain")),
    ("val loss", _read("val_loss", "pretrain")),
    ("fine-tune top-1", _read("top1", "finetune")),
    ("best top-1", _read("best_top1", "finetune")),
]


def collect(out: Path, grid: dict[str, list[str]], variants: list[Variant]) -> tuple[list[str], list[list]]:
    """(header, rows): a row per variant, its grid values then every COLUMNS figure (None: absent)."""
    header = list(grid) + [title for title, _ in COLUMNS]
    rows = [[v for _, v in var.values] + [read(out / var.name) for _, read in COLUMNS] for var in variants]
    return header, rows


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def format_markdown(header: list[str], rows: list[list], grid: dict[str, list[str]], note: str) -> str:
    """The long table (a row per variant), and for a two-key grid the headline figure (fine-tune
    top-1 where present, else the validation loss, else the training loss) as a matrix, the first
    key down and the second across, as the paper's Table 2 lays out ratio x patch size."""
    used = [i for i in range(len(grid), len(header)) if any(r[i] is not None for r in rows)]
    keep = list(range(len(grid))) + used
    lines = [note, "", "| " + " | ".join(header[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(_cell(r[i]) for i in keep) + " |" for r in rows]
    if len(grid) == 2 and used:
        head = next((i for i in (len(grid) + 2, len(grid) + 1, len(grid)) if i in used), used[0])
        (k1, v1), (k2, v2) = grid.items()
        at = {(r[0], r[1]): r[head] for r in rows}
        lines += ["", f"{header[head]}: {k1} (rows) x {k2} (columns)", "",
                  f"| {k1} \\ {k2} | " + " | ".join(v2) + " |", "|" + "---|" * (len(v2) + 1)]
        lines += [f"| {a} | " + " | ".join(_cell(at[(a, b)]) for b in v2) + " |" for a in v1]
    return "\n".join(lines) + "\n"


def format_csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in r] for r in rows])
    return buf.getvalue()


def plot(header: list[str], rows: list[list], n_keys: int, path: Path, title: str) -> None:
    """A bar panel per figure present (training loss, validation loss, top-1...), a bar per variant."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    used = [i for i in range(n_keys, len(header)) if any(r[i] is not None for r in rows)] or [n_keys]
    labels = ["\n".join(str(v) for v in r[:n_keys]) for r in rows]
    fig = Figure(figsize=(max(4.0, 0.9 * len(rows)) * len(used) / 1.5 + 1, 3.8))
    axes = fig.subplots(1, len(used), squeeze=False)[0]
    for ax, i in zip(axes, used):
        ax.bar(range(len(rows)), [math.nan if r[i] is None else r[i] for r in rows], color="C0")
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(header[i])
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def write_results(out: Path, grid: dict[str, list[str]], variants: list[Variant], note: str) -> Path:
    header, rows = collect(out, grid, variants)
    write_text(out / "results.md", format_markdown(header, rows, grid, note))
    write_text(out / "results.csv", format_csv(header, rows))
    plot(header, rows, len(grid), out / "results.png", f"{out}: " + " x ".join(grid))
    return out / "results.md"


@dataclass
class SweepSpec:
    """What `simmim sweep` was asked: the recipes, the grid, the shared overrides, the folder."""
    config: str | None
    grid: dict[str, list[str]]
    out: Path
    overrides: tuple[str, ...] = ()
    finetune: str | None = None
    finetune_overrides: tuple[str, ...] = ()
    # run.mirror of the recipe and shared overrides (set by `sweep`): each run gets its own prefix under
    # it, <mirror>/<variant>/pretrain (a mirror prefix is one run's, as a run folder is)
    mirror: str = ""

    def pretrain_args(self, v: Variant) -> list[str]:
        return [*self.overrides, *v.overrides(), f"run.out_dir={self.out / v.name / 'pretrain'}",
                *self.mirror_args(v, "pretrain")]

    def mirror_args(self, v: Variant, stage: str) -> list[str]:
        return [f"run.mirror={self.mirror.rstrip('/')}/{v.name}/{stage}"] if self.mirror else []

    def finetune_args(self, v: Variant, pretrained: Path | str, arch: str) -> list[str]:
        """The fine-tuning's overrides: the encoder is the pre-trained one (`arch`, the variant's
        model.arch); a grid over model.window_size reaches the fine-tuning too."""
        window = [f"{k}={x}" for k, x in v.values if k == "model.window_size"]
        return [*self.finetune_overrides, f"model.arch={arch}", *window, f"finetune.pretrained={pretrained}",
                f"run.out_dir={self.out / v.name / 'finetune'}", *self.mirror_args(v, "finetune")]


def load_configs(spec: SweepSpec, variants: list[Variant]) -> list[tuple]:
    """Every variant's (pretrain config, finetune config or None), all loaded and validated before
    any run starts, so a bad value stops the sweep in one line naming the variant."""
    configs = []
    for v in variants:
        try:
            pre = load_config(spec.config, spec.pretrain_args(v))
            ft = (load_config(spec.finetune, spec.finetune_args(v, "(its last checkpoint)", pre.model.arch),
                              FinetuneConfig)
                  if spec.finetune else None)
        except ConfigError as e:
            raise ConfigError(f"variant {v.name}: {e}") from None
        configs.append((pre, ft))
    return configs


def run_variant(spec: SweepSpec, v: Variant, pre, ft, say: Callable[[str], None]) -> None:
    """Pre-trains (unless finished), then fine-tunes from the last checkpoint (unless finished)."""
    pre_dir = spec.out / v.name / "pretrain"
    if finished(pre_dir, pre.train.epochs):
        say(f"pretrain finished, skipped ({pre_dir})")
    else:
        say(f"pretrain -> {pre_dir}")
        pretrain(pre)
    if ft is None:
        return
    ft_dir = spec.out / v.name / "finetune"
    if finished(ft_dir, ft.train.epochs, key="top1"):
        say(f"finetune finished, skipped ({ft_dir})")
        return

    ckpt = all_checkpoints(pre_dir)[-1][1]
    say(f"finetune from {ckpt} -> {ft_dir}")
    finetune(load_config(spec.finetune, spec.finetune_args(v, ckpt, pre.model.arch), FinetuneConfig))


def job_lines(spec: SweepSpec, variants: list[Variant]) -> str:
    """One line per variant: the arguments of its trainer/run.sh job (shell-quoted)."""
    config = ["--config", spec.config] if spec.config else []
    return "".join(shlex.join([*config, *spec.pretrain_args(v)]) + "\n" for v in variants)


def sweep(spec: SweepSpec, jobs_only: bool = False, table_only: bool = False) -> Path:
    """Runs every variant of `spec` not yet finished (module docstring), then writes the results;
    with `jobs_only`, writes OUT/jobs.txt (one trainer/run.sh argument line per variant) instead of
    running; with `table_only`, writes the results of what the run folders hold, running nothing
    (variants run elsewhere, e.g. as SLURM jobs). Returns the file written. A variant that diverges
    leaves its row empty and the sweep goes on; Diverged at the end names them. ConfigError before any run for a bad grid or value, or when
    started under torchrun (one sweep process runs its variants one after another; on many GPUs
    each variant is its own trainer/run.sh job)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("simmim sweep runs its variants in one process: on several GPUs launch each variant as "
                          "a trainer/run.sh job (simmim sweep --jobs lists them; see docs/experiments.md)")
    variants = expand(spec.grid)
    spec.mirror = load_config(spec.config, list(spec.overrides)).run.mirror
    configs = load_configs(spec, variants)
    spec.out.mkdir(parents=True, exist_ok=True)
    if jobs_only:
        return write_text(spec.out / "jobs.txt", job_lines(spec, variants))
    if table_only:
        return write_results(spec.out, spec.grid, variants, _note(spec))

    start, diverged = time.perf_counter(), []
    for i, (v, (pre, ft)) in enumerate(zip(variants, configs)):
        def say(msg: str, i=i, v=v) -> None:
            print(f"sweep [{i + 1}/{len(variants)}] {v.name}: {msg}", flush=True)

        try:
            run_variant(spec, v, pre, ft, say)
        except Diverged as e:  # a setting of the ablation that does not train: a gap in the table, not the end
            say(f"diverged, going on with the next variant: {e}")
            diverged.append(v.name)
        write_results(spec.out, spec.grid, variants, _note(spec))
    print(f"sweep: {len(variants)} variants done in {time.perf_counter() - start:.0f} s; "
          f"{spec.out / 'results.md'}", flush=True)
    if diverged:
        raise Diverged(f"{len(diverged)} variant(s) diverged ({', '.join(diverged)}): their rows are empty; "
                       f"the same command retries them from their last checkpoints")
    return spec.out / "results.md"


def _note(spec: SweepSpec) -> str:
    ft = f", fine-tuned with {spec.finetune}" if spec.finetune else ""
    shared = f" ({' '.join(spec.overrides)})" if spec.overrides else ""
    return f"simmim sweep of {spec.config or 'the defaults'}{shared}{ft}; run folders under {spec.out}."
