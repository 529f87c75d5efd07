"""FFCV's `DatasetWriter` with a failing worker ending the run: the one adapter over the writer's
private `_write_common` and its worker function (ffcv 1.0.x, `ffcv/writer.py`).

FFCV's writer waits for its worker processes by polling a shared counter until every sample is
written. A worker that raises (a sample larger than a page: "Tried allocating N but page size is
M"; an encoder error) never adds its samples, and the parent waits forever. Here every worker runs
under a guard that writes its error, with the sample it was on, to `error_dir/worker-<pid>` and exits
with status 1; the parent's wait checks the workers and raises `WriterFailed` (one line) as soon
as one has failed, after stopping the others.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from multiprocessing import Process, Queue, Value
from pathlib import Path
from time import sleep

from ffcv.memory_allocator import MemoryAllocator
from ffcv.writer import DatasetWriter, worker_job_indexed_dataset
from tqdm import tqdm

REQUIRED = ("_write_common", "prepare", "finalize")  # FFCV methods the adapter relies on (a test checks)


class WriterFailed(RuntimeError):
    """A writer worker failed; str() is one line naming the sample and the error."""


def _guarded_worker(error_dir: str, *args) -> None:
    """FFCV's indexed-dataset worker, then the dataset's `worker_done()` if it has one (what the
    worker gathered besides the samples, for the parent); on any error, record it (with the
    dataset's `current` sample, if it has one) and exit 1 instead of leaving the parent waiting."""
    try:
        worker_job_indexed_dataset(*args)
        done = getattr(args[-1], "worker_done", None)
        if done is not None:
            done()
    except BaseException as e:  # noqa: BLE001 - recorded for the parent, then exit non-zero
        sample = getattr(args[-1], "current", "")
        where = f"{sample}: " if sample else ""
        message = f"{where}{type(e).__name__}: {e}".splitlines()[0]
        Path(error_dir, f"worker-{os.getpid()}").write_text(message)
        sys.exit(1)


class CheckedWriter(DatasetWriter):
    """`DatasetWriter` whose `from_indexed_dataset` raises WriterFailed when a worker fails."""

    def __init__(self, fname: str, fields, error_dir: Path, page_size: int, num_workers: int, progress: bool = True):
        super().__init__(fname, fields, page_size=page_size, num_workers=num_workers)
        self.error_dir, self.progress = Path(error_dir), progress

    def from_indexed_dataset(self, dataset, chunksize: int = 100) -> None:
        indices = list(enumerate(range(len(dataset))))
        work = [indices[i:i + chunksize] for i in range(0, len(indices), chunksize)]
        self._write_common(len(indices), work, functools.partial(_guarded_worker, str(self.error_dir)), (dataset,))

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        # FFCV's own sequence (prepare, queue the work, start workers, wait, finalize), with the
        # wait watching the workers
        self.num_samples = num_samples
        self.prepare()
        workqueue: Queue = Queue()
        for todo in queue_content:
            workqueue.put(todo)
        allocations_queue: Queue = Queue()
        for _ in range(self.num_workers):
            workqueue.put(None)
        done_number = Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        worker_args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator, done_number,
                       allocations_queue, *extra_worker_args)
        processes = [Process(target=work_fn, args=worker_args) for _ in range(self.num_workers)]
        for p in processes:
            p.start()
        try:
            with tqdm(total=num_samples, disable=not self.progress, mininterval=1.0) as bar:
                previous = 0
                while previous != num_samples:
                    self._raise_if_failed(processes)
                    bar.update(done_number.value - previous)
                    previous = done_number.value
                    sleep(0.1)
            allocations = []
            for _ in processes:
                while True:
                    self._raise_if_failed(processes)
                    try:
                        allocations.extend(allocations_queue.get(timeout=0.5))
                        break
                    except Exception:  # noqa: BLE001 - queue.Empty: look at the workers again
                        continue
            for p in processes:
                p.join()
            self.finalize(allocations)
        finally:
            for p in processes:
                if p.is_alive():
                    p.terminate()
                    p.join()
            self.metadata_sm.close()
            self.metadata_sm.unlink()

    def _raise_if_failed(self, processes) -> None:
        if any(p.exitcode not in (None, 0) for p in processes):
            errors = sorted(f.read_text() for f in self.error_dir.glob("worker-*"))
            codes = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if errors:
                raise WriterFailed(errors[0])
            why = (" (killed by the system: most likely out of memory)" if codes[0] == -9 else
                   f" (killed by signal {-codes[0]})" if codes[0] < 0 else "")
            raise WriterFailed(f"a writer process died (exit code {codes[0]}){why}; lower --workers "
                               f"(each holds images at up to --max-resolution) or --max-pixels, and run again")
