"""`simmim bench NAME [...]`: the benchmarks' subcommand, added to the `simmim` command by cli/main.py.

Dependencies run one way (DESIGN.md): benchmarks use the trainer, the pipeline, the kernels and
core; only the top-level cli/ imports this module, to add `bench` to the trainer's parser.

    simmim bench avgdist [...]    the paper's Figure 3a
    simmim bench kernels [...]    fused kernels vs references
    simmim bench step [...]       training-step speed and MFU
    simmim bench claims [...]     the paper's efficiency claims vs other methods
    simmim bench loaders [...]    images/sec of each loader, same images
    simmim bench compile [...]    Triton kernels built for sm_90/sm_80, no GPU
    simmim bench heads [...]      the paper's Table 3: each prediction head's cost vs the linear one
    simmim bench memory [...]     per-GPU memory of each encoder under DDP and FSDP2
    simmim bench scale [...]      listing, scan, convert and loaders on an ImageNet-sized tree
"""
from __future__ import annotations

import argparse
from typing import Callable

# Each benchmark's module is imported when its command runs (as trainer/cli.py does for its commands):
# `simmim --help` or `simmim pretrain` then does not import every benchmark and its dependencies.


def _avgdist(argv):
    from .avg_dist import main
    return main(argv)


def _kernels(argv):
    from .kernels import main
    return main(argv)


def _step(argv):
    from .step import main
    return main(argv)


def _claims(argv):
    from .claims import main
    return main(argv)


def _loaders(argv):
    from .loaders import main
    return main(argv)


def _compile(argv):
    from .compile_check import main
    return main(argv)


def _heads(argv):
    from .heads import main
    return main(argv)


def _memory(argv):
    from .memory import main
    return main(argv)


def _scale(argv):
    from .scale import main
    return main(argv)


# name -> the benchmark's main (imported on use: each pulls in its own heavy dependencies)
BENCHES: dict[str, Callable[[list[str]], object]] = {
    "avgdist": _avgdist, "kernels": _kernels, "step": _step, "claims": _claims, "loaders": _loaders,
    "compile": _compile, "memory": _memory, "scale": _scale, "heads": _heads}


def cmd_bench(args) -> None:
    BENCHES[args.name](args.rest)


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (results/<name>-<device>/: markdown, JSON, PNG)")
    p.add_argument("name", choices=list(BENCHES))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (NAME --help)")
    p.set_defaults(fn=cmd_bench)
