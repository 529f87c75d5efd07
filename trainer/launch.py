"""`python -m simmim.trainer.launch [torchrun options] SCRIPT_OR_-m MODULE [args]`: torchrun, ending
with the ranks' own lines. trainer/run.sh starts training through it.

torchrun (`torch.distributed.run`) ends a stopped or failed job by raising out of its `main`:
a SIGTERM / SIGUSR1 it receives (and passes to the ranks) becomes a SignalException traceback, a
rank that exited non-zero a ChildFailedError traceback with a failure table, printed after the
ranks have already said in one line what happened (a checkpoint written, a file to fix, a peer
lost), or printed their own traceback for a bug. Here torchrun's public `run(args)` runs with
its own argument parser, and those two exceptions end the launcher with one line and an exit
status instead: 128 + the signal after a signal (run.sh turns a forwarded stop into 75), the
first failed rank's status after a failure (naming that rank and how it ended, since a rank
killed with SIGKILL could not say so itself). Anything else torchrun raises keeps its traceback.
"""
from __future__ import annotations

import os
import signal
import sys


def failure_line(error) -> tuple[str, int]:
    """(one line, exit status) for a ChildFailedError: the first rank that failed and how."""
    rank, failure = error.get_first_failure()
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"status {failure.exitcode}"
    status = failure.exitcode if 0 < failure.exitcode < 256 else 128 - failure.exitcode if failure.exitcode < 0 else 1
    return f"launch: rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) ended first, with {how}", status


def wait_for_children() -> None:
    """Until this process has no child left (the ranks torchrun started)."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except SignalException as e:
        # A signal sent to the whole process group reaches torchrun twice (directly and from
        # run.sh), and the second cuts short its wait for the ranks: wait here, deaf to repeats,
        # until every rank has written its checkpoint and exited.
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        wait_for_children()
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:
        line, status = failure_line(e)
        print(line, file=sys.stderr)
        sys.exit(status)


if __name__ == "__main__":
    main()
