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
torchrun's own warnings about ending the ranks ("Received SIGTERM death signal", "Sending process N
closing signal SIGTERM", one per rank) are dropped by a `logging.Filter` on its loggers
(`QuietStop`): the ranks' line, or the launcher's, says what happened.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run


class QuietStop(logging.Filter):
    """Drops torchrun's warnings that it got a stop signal and that it ends each rank with one
    (after a signal, or to restart or end the job after a rank failed: that rank is named by our
    own line, and torchrun's "will restart worker group" warning stays). Dropped by torch's format
    string (`record.msg`): should torch reword them, they are printed again, nothing worse. (A
    filter that waited for the first warning would miss the case where run.sh's forwarded copy of
    the signal cuts torchrun short before it logs it.)"""
    MESSAGES = ("Received %s death signal, shutting down workers",  # torch.distributed.elastic.agent.server.api
                "Sending process %s closing signal %s")  # torch.distributed.elastic.multiprocessing.api
    LOGGERS = ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.MESSAGES

    def install(self) -> "QuietStop":
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self


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
    args = get_args_parser().parse_args(argv)
    QuietStop().install()
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
