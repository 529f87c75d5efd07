"""The `simmim` console script (setup.py) and `python -m simmim.cli`: every command.

Dependencies run one way (DESIGN.md): core <- kernels <- pipeline <- trainer <- benchmarks <- cli.
The trainer's CLI (`simmim.trainer.cli`, which `trainer/run.sh` calls) knows nothing of the
benchmarks, and benchmarks/cli.py only parses `simmim bench NAME ...`; this module, above both,
takes the trainer's parser, adds `bench`, and runs the result through the trainer's one error
handler (one line and exit 2 for a user error).
"""
from __future__ import annotations

import sys

from simmim.benchmarks.cli import add_bench
from simmim.trainer.cli import build_parser, drop_local_rank, run


def main(argv: list[str] | None = None) -> None:
    """Parses `argv` (default: sys.argv[1:]) and runs the command; exits 2 on a user error."""
    ap, sub = build_parser()
    add_bench(sub)
    run(ap.parse_args(drop_local_rank(sys.argv[1:] if argv is None else argv)))
