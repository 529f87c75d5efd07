"""What a run tells its user and how it is told to stop: the log file (records held until the run
folder is written), metrics.jsonl, one-line error text, and the stop flag that turns SIGTERM /
SIGUSR1 / Ctrl-C into a checkpoint and a clean exit (trainer/loop.py polls it between steps)."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from simmim.core.io import atomic_write

from .runfolder import job_id

log = logging.getLogger("simmim")


def one_line(e: Exception) -> str:
    """The message of `e`; for an error a DataLoader worker raised, the original message (the
    loader re-raises it with the worker's traceback folded into the text)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[-1].startswith(f"{type(e).__module__}.{type(e).__name__}: "):
        return lines[-1].split(": ", 1)[1]
    return " ".join(lines)


class HeldRecords(logging.Handler):
    """Keeps the records logged before the run folder is the run's (while the inputs are opened),
    for its log.txt once it is (`setup_logging(..., held=)`)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class RunLogFile(logging.FileHandler):
    """run_dir/log.txt. A write that fails (a full disk, a folder made read-only) is said once on
    the console, and the run logs there only, instead of logging's traceback for every record."""

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(self, "broken", False):
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            return super().handleError(record)
        self.broken = True
        print(f"cannot write {self.baseFilename} ({error.strerror or error}): logging to the console only",
              file=sys.stderr, flush=True)


class Console(logging.StreamHandler):
    """sys.stdout (or sys.stderr: `name`) as it is at each record, not as it was when the handler
    was made: a caller that swaps sys.stdout for a while (pytest's capture of each test,
    contextlib.redirect_stdout) and closes its stream afterwards must not leave the root logger
    writing to a closed file ("I/O operation on closed file" for every later record of the process)."""

    def __init__(self, name: str = "stdout"):
        logging.Handler.__init__(self)  # not StreamHandler's: it would bind a stream
        self.name_of_stream = name

    @property
    def stream(self):
        return getattr(sys, self.name_of_stream)


QUIET = ("boto3", "botocore", "s3transfer", "urllib3")  # their INFO lines ("Found credentials in environment
# variables.") are the library's, not the run's: the mirror's and the stream backend's clients alike


def quiet_libraries() -> None:
    """Keeps the INFO lines of the S3 client libraries (`QUIET`) out of the console and log.txt;
    their warnings and errors still show."""
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def console_logging(level: int) -> None:
    """A command's log lines on stderr (`Console`), bare, at `level`; nothing if the root logger
    has handlers already (a run's, or the caller's: `logging.basicConfig`)."""
    logging.basicConfig(level=level, format="%(message)s", handlers=[Console("stderr")])
    quiet_libraries()


def setup_logging(out_dir: Path | None, is_main: bool, held: HeldRecords | None = None) -> None:
    """Rank 0 logs to stdout (and out_dir/log.txt, where `held`'s records are written first), the
    other ranks only warnings. One format for every message of a run, config warnings included.
    The run detaches its log.txt when it ends (`close_run_log`)."""
    handlers: list[logging.Handler] = []
    if is_main:
        handlers.append(Console())
        if out_dir is not None:
            handlers.append(RunLogFile(out_dir / "log.txt"))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=handlers or None,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    quiet_libraries()
    if held is not None and len(handlers) == 2:
        for record in held.records:
            handlers[1].handle(record)


def close_run_log() -> None:
    """Detaches the run's log.txt (`RunLogFile`) from the root logger and closes it, when the run
    ends: a process that goes on after a run (a test, a notebook, a sweep) holds no open log file,
    and what it logs next does not land in that run's log.txt."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, RunLogFile)]:
        root.removeHandler(handler)
        handler.close()


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT (Ctrl-C); the training loop polls it and stops after the
    current step with a checkpoint. A second signal stops at once (Ctrl-C: KeyboardInterrupt; the
    others: SystemExit(128 + signal)), except one within `REPEAT_S` seconds of the first under
    torchrun, or of a SIGTERM / SIGUSR1 anywhere: that is the same request arriving twice (a signal
    sent to the whole process group, which torchrun passes on too; a terminal's Ctrl-C reaches the
    ranks and torchrun, which passes it on). A Ctrl-C outside torchrun reaches the trainer once per
    press, so its second press always counts. `announce`: whether this process says so in the log
    (rank 0: every rank gets the signal), once, at the first poll after the signal (not in the
    handler, which may interrupt the log's own write). `restore()` puts the previous handlers back."""
    REPEAT_S = 5.0
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, announce: bool = True):
        self.signum, self.at, self.announce = 0, 0.0, announce
        self.forwarded = bool(job_id() or os.environ.get("TORCHELASTIC_RESTART_COUNT"))  # torchrun passes signals on
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _handle(self, signum, frame):
        repeat = self.forwarded or self.signum != signal.SIGINT
        if self.signum and repeat and time.monotonic() - self.at < self.REPEAT_S:
            return
        if self.signum:  # a second signal: stop now, without a checkpoint
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.at = time.monotonic()
        self.signum = signum  # said by the next poll: logging inside a handler can re-enter the log's own write

    def again(self) -> str:
        """How to stop at once, for the log."""
        if self.signum == signal.SIGINT and not self.forwarded:
            return "press Ctrl-C again"
        return f"send it again, {self.REPEAT_S:.0f} s or more later,"

    def __call__(self) -> bool:
        if self.signum and self.announce:
            self.announce = False
            log.warning("received %s: stopping after the current step with a checkpoint (%s to stop at once)",
                        signal.Signals(self.signum).name, self.again())
        return self.signum != 0


class MetricsLog:
    """run_dir/metrics.jsonl, one record per line. On resume, records at or past the resumed
    step are dropped (atomically), so the log never holds a step twice, and so is a torn line
    (a process killed while writing it)."""

    def __init__(self, path: Path, keep_before_step: int | None):
        self.path = path
        if path.exists() and keep_before_step is not None:
            kept = [line for line in path.read_text().splitlines()
                    if (rec := _record(line)) is not None and rec.get("step", -1) < keep_before_step]
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))
        elif path.exists():
            path.unlink()

    def __call__(self, record: dict) -> None:
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def _record(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None

