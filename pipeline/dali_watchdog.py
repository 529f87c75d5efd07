"""A watchdog over DALI's Python worker processes (the parallel external source's pool).

The main process hands each DALI worker its tasks through a shared-memory queue guarded by
multiprocessing locks. When a worker dies (SIGKILL, the kernel's OOM killer, a SIGTERM sent to the
whole process group, which the workers share with the trainer), the next task put to its queue
waits forever in `shared_queue.put` for a process that will never answer, and a SIGTERM cannot
stop the trainer: its handler runs, returns, and the wait goes on. DALI's own observer thread sees
the death but only closes the result queue.

`WorkerWatchdog` looks at the workers' state in /proc from a daemon thread every `interval`
seconds. When one has died and the main thread is inside a DALI call (`guard()`), it interrupts
that call: SIGUSR2 to the main thread, whose handler (installed only while workers are watched,
the previous one put back after) raises `WorkerDied` there, inside the blocked wait (a lock wait
returns to run signal handlers). Outside a DALI call the next `guard()` raises at once. The
message names the worker, how it ended, and what to do.

`worker_pids` is the one place that reads DALI's private pool attribute (`Pipeline._py_pool`);
tests/test_dali.py checks that it still finds the workers. `remove_orphans` deletes the /dev/shm
files of processes that no longer exist (a SIGKILL leaves them behind).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import threading
from pathlib import Path

from simmim.core.errors import DatasetError

INTERRUPT = signal.SIGUSR2  # sent to our own main thread only


class WorkerDied(DatasetError):
    """A data loader's worker process died; the message names it and says what to do. Not a
    file problem: no list to rebuild (`needs_scan`)."""
    needs_scan = False


def worker_pids(pipe) -> list[int]:
    """The pids of a built DALI pipeline's Python workers ([] when it has none). Reads DALI's
    private `Pipeline._py_pool` (a `WorkerPool`, whose `pids()` is public)."""
    pool = getattr(pipe, "_py_pool", None)
    return list(pool.pids()) if pool is not None else []


def how_ended(pid: int) -> str | None:
    """None while `pid` runs; else how it ended ("killed by SIGKILL", "exited with status 1", or
    "ended" once reaped, by DALI's own pool), from /proc/PID/stat: state Z / X and the exit code
    (field 52, Linux 3.5+)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return "ended"
    fields = stat[stat.rindex(")") + 2:].split()  # fields 3.. (the name may hold spaces)
    if fields[0] not in ("Z", "X"):
        return None
    if len(fields) < 50:
        return "ended"
    code = int(fields[49])
    if code & 0x7F:
        try:
            return f"killed by {signal.Signals(code & 0x7F).name}"
        except ValueError:
            return f"killed by signal {code & 0x7F}"
    return f"exited with status {code >> 8}"


class WorkerWatchdog:
    """Watches worker processes (`watch(pids)`); `guard()` around every call that waits on them.
    See the module docstring."""

    def __init__(self, what: str = "DALI's Python worker", interval: float = 0.2):
        self.what, self.interval = what, interval
        self.pids: list[int] = []
        self.dead: tuple[int, str] | None = None
        self.inside = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_handler, self._installed = None, False
        self._main = threading.main_thread().ident

    def watch(self, pids: list[int]) -> None:
        """Watches `pids` from now on (a rebuilt pipeline's workers); [] stops watching."""
        self.close()
        self.pids, self.dead = list(pids), None
        if not self.pids:
            return
        if threading.current_thread() is threading.main_thread():
            self._old_handler, self._installed = signal.signal(INTERRUPT, self._interrupted), True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dali-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stops the thread and puts the previous SIGUSR2 handler back."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(INTERRUPT, self._old_handler if self._old_handler is not None else signal.SIG_DFL)
        self._old_handler, self._installed = None, False

    @contextlib.contextmanager
    def guard(self):
        """Around a call that waits on the workers: raises WorkerDied at once if one has died, or
        from inside the call when one dies during it."""
        self.check()
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def check(self) -> None:
        if self.dead is not None:
            raise self.error()

    def error(self) -> WorkerDied:
        pid, how = self.dead
        return WorkerDied(f"{self.what} process {pid} {how}: killed from outside (out of host memory? see "
                          f"`dmesg`), or by a signal sent to the whole process group")

    def scan(self) -> tuple[int, str] | None:
        """(pid, how it ended) of the first watched worker that has died, looked up now; else None."""
        if self.dead is None:
            for pid in self.pids:
                how = how_ended(pid)
                if how is not None:
                    self.dead = (pid, how)
                    break
        return self.dead

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.scan()
            if self.dead is not None and self.inside and self._installed:
                signal.pthread_kill(self._main, INTERRUPT)  # again each interval, until the call returns

    def _interrupted(self, signum, frame) -> None:
        if self.inside and self.dead is not None:
            self.inside = False
            raise self.error()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def worker_stop_signals(action=signal.SIG_DFL, exiting=None) -> None:
    """In a loader's worker process: the stop signals (SIGTERM, SIGUSR1, SIGINT) get `action`, and
    the worker is ended (SIGKILL) when the thread that forked it ends (Linux's PR_SET_PDEATHSIG).

    A forked worker inherits the trainer's Python handlers, which would keep it alive and logging
    "stopping after the current step" (through a copy of the trainer's logging locks, where it can
    get stuck). What replaces them depends on how the loader ends its workers:
    - DALI (`signal.SIG_DFL`): its pool ends a worker that does not stop within 1 s with SIGTERM
      and then waits for it without a limit, so a worker must die of SIGTERM. A group SIGTERM
      ends the workers; the watchdog sees it and the trainer stops as the signal asked.
    - torch's DataLoader (`signal.SIG_IGN`, and `exiting`): a worker's death raises "DataLoader
      worker (pid N) is killed by signal" from torch's SIGCHLD handler anywhere in the main thread
      (even inside a checkpoint being written), so the workers ignore the stop signals: they keep
      serving batches while the trainer finishes its step and writes its checkpoint, and end when
      the DataLoader shuts them down or their parent ends. One exception: at interpreter exit,
      multiprocessing ends the workers of a DataLoader still alive with SIGTERM and waits for them
      without a limit, so once `exiting[0]` is true (a shared flag the parent sets from an atexit
      hook) SIGTERM ends the worker after all (with status 0).
    """
    if exiting is not None and action == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, functools.partial(_end_if_exiting, exiting))
    else:
        signal.signal(signal.SIGTERM, action)
    for sig in STOP_SIGNALS[1:]:
        signal.signal(sig, action)
    # DALI's workers never notice their parent's death (they wait for tasks forever, holding the
    # parent's stdout): Linux ends them with it
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


def _end_if_exiting(exiting, signum, frame) -> None:
    # with status 0: torch's SIGCHLD handler in the parent takes a death by signal for a crash; at
    # once, without the exit's finalizers: the worker's result queue flushes its unsent batches
    # first, and with the parent no longer reading, a pipe full of them (the stream loader's stored
    # files, not in shared memory) blocks that flush, and the parent's wait for the worker, forever
    if exiting[0]:
        os._exit(0)


def remove_orphans(folder: str | Path, prefix: str) -> list[Path]:
    """Deletes `folder/{prefix}{pid}-*` files whose process `pid` no longer exists (left by a
    process killed with SIGKILL); returns them."""
    removed = []
    for path in Path(folder).glob(f"{prefix}*-*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path)
        except PermissionError:  # another user's live process
            pass
    return removed
