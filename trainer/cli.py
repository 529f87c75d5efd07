"""The `simmim` command.

    simmim pretrain --config RECIPE [key.sub=value ...]   pre-train (resumes from run.out_dir)
    simmim sample-data [--out data/sample]                build the embedded sample dataset
    simmim bench avgdist [...]                            the paper's Figure 3a
    simmim bench kernels [...]                            fused kernels vs references
    simmim bench step [...]                               training-step speed and MFU
    simmim bench claims [...]                             the paper's efficiency claims vs other methods

User errors (bad path, bad config key, unreadable data) end with one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys


def cmd_pretrain(args) -> None:
    from .config import load_config
    from .pretrain import pretrain

    pretrain(load_config(args.config, args.overrides))


def cmd_sample_data(args) -> None:
    from simmim.pipeline.sample_data import build_sample_dataset

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = build_sample_dataset(args.out, force=args.force)
    print(out)


def cmd_bench(args) -> None:
    if args.name == "avgdist":
        from simmim.benchmarks.avg_dist import main as run
    elif args.name == "kernels":
        from simmim.benchmarks.kernels import main as run
    elif args.name == "step":
        from simmim.benchmarks.step import main as run
    elif args.name == "claims":
        from simmim.benchmarks.claims import main as run
    run(args.rest)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="simmim", description="SimMIM pre-training, made fast and practical")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train a SimMIM model")
    p.add_argument("--config", "-c", default=None, help="a recipe name (e.g. demo, swin_base_100ep) or YAML path")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=5")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("sample-data", help="build the embedded sample dataset (no download)")
    p.add_argument("--out", default="data/sample")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(fn=cmd_sample_data)

    p = sub.add_parser("bench", help="benchmarks")
    p.add_argument("name", choices=["avgdist", "kernels", "step", "claims"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)

    args = ap.parse_args(argv)
    from simmim.pipeline.folder import DatasetError

    from .config import ConfigError

    from .pretrain import REQUEUE_EXIT, Diverged, Preempted

    try:
        args.fn(args)
    except Preempted as e:
        print(f"simmim {args.command}: {e}", file=sys.stderr)
        sys.exit(REQUEUE_EXIT)
    except Diverged as e:
        print(f"simmim {args.command}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except (ConfigError, DatasetError, FileNotFoundError, ValueError) as e:
        print(f"simmim {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"simmim {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
