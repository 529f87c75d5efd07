"""The `simmim` command.

    simmim pretrain --config RECIPE [key.sub=value ...]   pre-train (resumes from run.out_dir)
    simmim finetune --config RECIPE [key.sub=value ...]   fine-tune (finetune.pretrained=CKPT) and evaluate
    simmim evaluate CKPT [--data VAL] [--backend B]       top-1 / top-5 of a fine-tuned checkpoint
    simmim sweep --config R --grid K=V1,V2 --out DIR      a grid of runs and its results table
    simmim sample-data [--out data/sample]                build the embedded sample dataset
    simmim scan SRC [--out LIST]                          check every image; clean list + bad-file report
    simmim convert SRC DST.beton [...]                    ImageNet folder (or list) -> FFCV .beton
    simmim shard SRC DEST [--shard-size 64mb]             folder (or list) -> streaming shards, local or s3://
    simmim inspect X.beton                                samples, labels, resolutions, decode check
    simmim export CKPT OUT_DIR [--format timm|swin]      the encoder for timm / detection codebases
    simmim plot RUN [RUN ...] [--out PNG]                 loss and lr curves of runs, overlaid
    simmim probe CKPT --config RECIPE [key.sub=value ...]   linear probe of a frozen encoder (top-1 / top-5)
    simmim reconstruct CKPT IMAGE... --out PNG [--mask M]  the paper's reconstruction figure, any image / mask

The `simmim` console script is cli/main.py, at the top of the dependency graph: it adds
`simmim bench NAME` (benchmarks/cli.py, which sits above the trainer) to the parser this module
builds (`build_parser`) and runs a parsed command through this module's `run`;
`python -m simmim.trainer.cli`, as trainer/run.sh calls it, has every command but `bench`.

User errors (a `UserError`: bad path, config key or value, unreadable data or checkpoint) end with
one line on stderr and exit 2; a divergence, or a collective that failed because another rank
went away (`PeerLost`), one line and exit 1; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from simmim.core.errors import UserError
from simmim.core.io import WRITE_REFUSED
from simmim.pipeline.decode import MAX_PIXELS
from simmim.pipeline.options import BACKENDS as DATA_BACKENDS

from .distributed import PeerLost
from .runlog import console_logging, setup_logging

# The commands' modules (and the loop, model and timm behind them) are imported inside each cmd_*
# function (with benchmarks/cli.py's, the only imports of our modules inside functions): `simmim --help`
# or one command then does not import every command (tests/test_imports.py, CLI_DISPATCH).


def run_logging() -> None:
    """The run's log format from the start, so that what the config's loading warns (a renamed
    key) reads like the run's other warnings; rank 0 only (RANK from torchrun)."""
    setup_logging(None, os.environ.get("RANK", "0") == "0")


def cmd_pretrain(args) -> None:
    from .config import load_config
    from .pretrain import pretrain

    run_logging()
    pretrain(load_config(args.config, args.overrides))


def cmd_finetune(args) -> None:
    from .config import load_config
    from .finetune import finetune
    from .finetune_options import FinetuneConfig

    run_logging()
    finetune(load_config(args.config, args.overrides, FinetuneConfig))


def cmd_probe(args) -> None:
    from .config import load_config
    from .probe import ProbeConfig, probe

    run_logging()
    # --config takes the overrides after the recipe too: argparse cannot give a positional list
    # after an option once the checkpoint (the first positional) has been read
    recipe, *after = args.config or [None]
    overrides = [f"probe.pretrained={args.checkpoint}", *args.overrides, *after]
    probe(load_config(recipe, overrides, ProbeConfig))


def cmd_evaluate(args) -> None:

    from .finetune import evaluate_checkpoint

    console_logging(logging.WARNING)
    result = evaluate_checkpoint(args.checkpoint, args.data, args.backend, args.overrides)
    print(json.dumps(result) if args.json else
          f"{result['data']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
          f"loss {result['val_loss']:.4f}  ({result['val_images']} images)")


def cmd_sweep(args) -> None:

    from .sweep import SweepSpec, parse_grid, sweep

    spec = SweepSpec(args.config, parse_grid(args.grid), Path(args.out), tuple(args.overrides), args.finetune,
                     tuple(args.finetune_set))
    print(sweep(spec, jobs_only=args.jobs, table_only=args.table))


def cmd_sample_data(args) -> None:
    from simmim.pipeline.sample_data import build_sample_dataset

    console_logging(logging.INFO)
    out = build_sample_dataset(args.out, force=args.force)
    print(out)


def cmd_scan(args) -> None:
    from simmim.pipeline.scanlist import scan_command

    console_logging(logging.WARNING)
    scan_command(args.src, args.out, args.workers, args.on_error, args.max_pixels, args.channels, args.stats)


def cmd_convert(args) -> None:
    from simmim.pipeline.convert import convert

    console_logging(logging.INFO)
    report = convert(args.src, args.dst, max_resolution=args.max_resolution or None, write_mode=args.write_mode,
                     compress_probability=args.compress_probability, jpeg_quality=args.jpeg_quality,
                     workers=args.workers, chunk_size=args.chunk_size, limit=args.limit, on_error=args.on_error,
                     force=args.force, page_size=args.page_size, max_pixels=args.max_pixels,
                     channels=args.channels, stats=args.stats)
    if report["bad"]:
        print(f"{report['bad']} unreadable file(s) skipped; listed in the report beside {args.dst}")


def cmd_shard(args) -> None:
    from simmim.pipeline.shards import shard_command

    console_logging(logging.WARNING)
    shard_command(args.src, args.dest, args.shard_size, args.workers, args.max_pixels, args.overwrite)


def cmd_inspect(args) -> None:

    from simmim.pipeline.convert import format_inspect, inspect

    info = inspect(args.path, decode=not args.no_decode, workers=args.workers)
    print(json.dumps(info, indent=1) if args.json else format_inspect(info))
    if info.get("decode_failures"):
        sys.exit(1)


def cmd_export(args) -> None:
    from .export import export

    console_logging(logging.INFO)
    print(export(args.checkpoint, args.out, fmt=args.format, force=args.force))


def cmd_reconstruct(args) -> None:
    from .reconstruct import parse_patch_sizes, reconstruct

    print(reconstruct(args.checkpoint, args.images, args.out, args.mask, args.mask_ratio,
                      parse_patch_sizes(args.mask_patch_size), args.seed, args.device))


def cmd_plot(args) -> None:
    from .monitor import plot_runs

    print(plot_runs(args.runs, args.out))


def drop_local_rank(argv: list[str]) -> list[str]:
    """`python -m torch.distributed.launch` passes --local-rank=N (or --local_rank N): the rank
    comes from the environment (LOCAL_RANK) here, so the flag is dropped, with a note once."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.split("=", 1)[0] in ("--local-rank", "--local_rank"):
            skip = "=" not in a and i + 1 < len(argv) and argv[i + 1].lstrip("-").isdigit()
            continue
        out.append(a)
    if len(out) < len(argv) and os.environ.get("RANK", "0") == "0":
        print("simmim: --local-rank ignored (the rank comes from the environment); torch.distributed.launch is "
              "deprecated: start with torchrun or trainer/run.sh", file=sys.stderr)
    return out


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The `simmim` parser and its subcommand table (to which cli/main.py adds `bench`);
    each subcommand sets `fn`, called by `run` with the parsed arguments."""
    ap = argparse.ArgumentParser(prog="simmim", description="SimMIM pre-training, made fast and practical")
    sub = ap.add_subparsers(dest="command", required=True)
    add_training_commands(sub)
    add_sweep_command(sub)
    add_data_commands(sub)
    add_output_commands(sub)
    return ap, sub


def add_training_commands(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train a SimMIM model")
    p.add_argument("--config", "-c", default=None, help="a recipe name (e.g. demo, swin_base_100ep) or YAML path")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=5")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a SimMIM checkpoint for classification, evaluating each epoch")
    p.add_argument("--config", "-c", default=None, help="a recipe (finetune_demo, finetune_swin_base_100ep, ...) or YAML")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. finetune.pretrained=runs/demo/checkpoint-00000240.pt")
    p.set_defaults(fn=cmd_finetune)

    p = sub.add_parser("probe", help="linear probe of a pre-trained encoder (frozen), top-1 / top-5 each epoch")
    p.add_argument("checkpoint", help="a pre-training checkpoint (any layout finetune.pretrained reads)")
    p.add_argument("--config", "-c", nargs="+", default=None, metavar="RECIPE [key.sub=value ...]",
                   help="a recipe (probe_demo, probe_vit_base) or YAML, then overrides, e.g. probe.layer=8")
    p.add_argument("overrides", nargs="*", help="key.sub=value, also accepted before --config")
    p.set_defaults(fn=cmd_probe)

    p = sub.add_parser("evaluate", help="top-1 / top-5 of a fine-tuned checkpoint (resize + centre crop)")
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="validation folder, list or .beton (default: finetune.val_path)")
    p.add_argument("--backend", default=None, choices=DATA_BACKENDS)
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. data.batch_size=64")
    p.set_defaults(fn=cmd_evaluate)


def add_sweep_command(sub) -> None:
    p = sub.add_parser("sweep", help="pre-train (and fine-tune) every combination of a grid; results table")
    p.add_argument("--config", "-c", default=None, help="the pre-training recipe every variant starts from")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values (repeat for more keys: every combination runs)")
    p.add_argument("--out", required=True, help="sweep folder: a run folder per variant, results.md/.csv/.png")
    p.add_argument("--finetune", default=None, metavar="FT_RECIPE",
                   help="then fine-tune each variant from its last checkpoint with this recipe")
    p.add_argument("--finetune-set", action="append", default=[], metavar="KEY=V",
                   help="an override for every fine-tuning run (repeatable)")
    p.add_argument("--jobs", action="store_true",
                   help="write OUT/jobs.txt (one trainer/run.sh argument line per variant) instead of running")
    p.add_argument("--table", action="store_true", help="only write the results of the finished runs under OUT")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for every pre-training run")
    p.set_defaults(fn=cmd_sweep)


def add_data_commands(sub) -> None:
    p = sub.add_parser("sample-data", help="build the embedded sample dataset (no download)")
    p.add_argument("--out", default="data/sample")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(fn=cmd_sample_data)

    p = sub.add_parser("scan", help="check that every image decodes; write a clean file list and a report")
    p.add_argument("src", help="class-folder tree (train/<class>/<image>) or a `path label` list")
    p.add_argument("--out", default=None, help="the clean list (default: SRC.clean.txt beside SRC)")
    p.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="refuse larger images (width x height)")
    p.add_argument("--channels", type=int, default=3,
                   help="data.channels: 3 (RGB), 1 (grey; also .npy) or N (.npy / .tif arrays)")
    p.add_argument("--stats", action="store_true",
                   help="also measure the per-channel mean and std (written beside the list; pre-training reads them)")
    p.set_defaults(fn=cmd_scan)

    p = sub.add_parser("convert", help="convert an ImageNet-style folder or list to an FFCV .beton")
    p.add_argument("src", help="class-folder tree (train/<class>/<image>) or a `path label` list")
    p.add_argument("dst", help="output .beton (written atomically; class list and report beside it)")
    p.add_argument("--max-resolution", type=int, default=256, help="cap on the longer side (0: keep)")
    p.add_argument("--write-mode", choices=["jpg", "raw", "proportion", "smart"], default="jpg")
    p.add_argument("--compress-probability", type=float, default=0.5, help="proportion mode: share stored as JPEG")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=0, help="processes (0: all cores)")
    p.add_argument("--chunk-size", type=int, default=100, help="images per work item")
    p.add_argument("--limit", type=int, default=0, help="convert only N images, spread over the classes (reads only those files)")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="unreadable files: skip and report them, or stop naming the first")
    p.add_argument("--force", action="store_true", help="overwrite an existing DST")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="refuse larger images (width x height)")
    p.add_argument("--page-size", type=int, default=0, help="bytes per .beton page (0: fits the largest sample)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3,
                   help="data.channels the .beton is for (it stores RGB; 1: trained on as grey), for its statistics")
    p.add_argument("--stats", action="store_true",
                   help="measure the per-channel mean and std in this pass when SRC has no statistics file "
                        "(from `simmim scan --stats`, copied otherwise); written beside DST")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("shard", help="write a folder or list as MosaicML streaming shards (data.backend: stream)")
    p.add_argument("src", help="class folders, an unlabeled folder or a list (what data.path reads)")
    p.add_argument("dest", help="a local folder or an object-store prefix (s3://bucket/prefix)")
    p.add_argument("--shard-size", default="64mb", help="largest shard (e.g. 64mb)")
    p.add_argument("--workers", type=int, default=0, help="processes checking the images (0: all cores)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="refuse larger images (width x height)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete shard set at DEST")
    p.set_defaults(fn=cmd_shard)

    p = sub.add_parser("inspect", help="summarise a .beton and check that every sample decodes")
    p.add_argument("path")
    p.add_argument("--no-decode", action="store_true", help="metadata only")
    p.add_argument("--json", action="store_true")
    p.add_argument("--workers", type=int, default=0)
    p.set_defaults(fn=cmd_inspect)


def add_output_commands(sub) -> None:
    p = sub.add_parser("export", help="the encoder of a pre-training checkpoint, for timm or detection codebases")
    p.add_argument("checkpoint", help="a simmim pre-training checkpoint (runs/NAME/checkpoint-*.pt)")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--format", default="timm", choices=["timm", "swin"],
                   help="timm: model.safetensors + config.json for timm.create_model('local-dir:OUT', "
                        "pretrained=True); swin: the original Swin key layout (detection / segmentation)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("plot", help="overlay the loss and lr curves of runs in one PNG")
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="the PNG to write")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("reconstruct", help="original / masked / pasted prediction / reconstruction of images")
    p.add_argument("checkpoint", help="a pre-training checkpoint: file, DCP folder or microsoft/SimMIM release")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--mask", default="random", help="random | square | block | MASK.png (white = masked)")
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--mask-patch-size", default="", help="cell side(s) in pixels, e.g. 16,32 (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.set_defaults(fn=cmd_reconstruct)


def run(args: argparse.Namespace) -> None:
    """Runs `args.fn(args)`; user errors, stop requests and Ctrl-C become one line and an exit status."""
    from .loop import MIRROR_BEHIND_EXIT, REQUEUE_EXIT, Diverged, MirrorBehind, Preempted

    try:
        args.fn(args)
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":  # every rank stopped; one line for the job
            print(f"simmim {args.command}: {e}", file=sys.stderr)
        sys.exit(REQUEUE_EXIT)
    except MirrorBehind as e:
        print(f"simmim {args.command}: error: {e}", file=sys.stderr)
        sys.exit(MIRROR_BEHIND_EXIT)
    except (Diverged, PeerLost) as e:
        print(f"simmim {args.command}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except UserError as e:
        if not (getattr(e, "all_ranks", False) and os.environ.get("RANK", "0") != "0"):  # said once, by rank 0
            print(f"simmim {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a write (or read) the user's world refused: its path, not a traceback
        if e.errno not in WRITE_REFUSED:
            raise
        print(f"simmim {args.command}: error: {e.strerror}: '{e.filename}': fix its folder's permissions or free "
              f"space, or choose another path", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"simmim {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """The trainer's commands (no `bench`: see the module docstring)."""
    ap, _ = build_parser()
    run(ap.parse_args(drop_local_rank(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
