"""The next epoch's training views, drawn while this epoch trains (`data.backend: ffcv`).

`augment.sample_views` costs 11.4 us a sample (Python's `random.Random` seeding): ~15 s per
ImageNet epoch on one rank, a stall at every epoch start if drawn there. The order of epoch e + 1
from its first batch is known during epoch e, so a daemon thread draws its views into a second
`ViewTable` while FFCV's decoder reads the first, and the epoch start swaps the two. A start that
was not drawn ahead (the first epoch, a mid-epoch resume, a jump to another epoch) is drawn there,
on the calling thread, as before: the views are the same either way (each sample's view depends on
(seed, epoch, index) only).

The thread competes for the GIL with the training loop while it runs (~11 us of Python a sample);
the training loop mostly waits on the device and FFCV's queue, which release it.
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from .augment import Augmentation

CHUNK = 8192  # samples drawn between two looks at the stop request (~0.1 s)


class ViewsAhead:
    """Two `ViewTable`s (objects with `fill(indices, aug, seed, epoch)`): `activate` returns the one
    holding an epoch's views, `prepare` starts filling the other on a daemon thread, `close` stops it.

    tables: (first, second), the first installed in FFCV's reader; order_of: (epoch, start) ->
    the sample indices (int, this rank's order from position `start` on) that epoch reads;
    `precomputed` counts the epochs whose views came from the thread."""

    def __init__(self, tables, order_of: Callable[[int, int], np.ndarray], aug: Augmentation, seed: int):
        self.active, self.spare = tables
        self.order_of, self.aug, self.seed = order_of, aug, seed
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()
        self.drawing: tuple[int, int] | None = None  # (epoch, start) the thread draws
        self.ahead: tuple[int, int] | None = None  # (epoch, start) the spare holds in full
        self.error: BaseException | None = None
        self.precomputed = 0

    def activate(self, epoch: int, start: int):
        """The table with the views of `epoch`'s samples from position `start` on: the spare when
        the thread drew exactly that (it becomes the active one), else the active one refilled
        here. Re-raises, here, an exception the thread met. Call only once the previous epoch's
        FFCV iterator is closed: the returned table is written to before FFCV reads it."""
        if self.thread is not None and self.drawing != (epoch, start):
            self.stop.set()  # drawing an epoch that will not come next: stop it early
        self.join()
        error, self.error = self.error, None
        if error is not None:
            raise error
        if self.ahead == (epoch, start):
            self.active, self.spare = self.spare, self.active
            self.precomputed += 1
        else:
            self.fill(self.active, epoch, start, None)
        self.ahead = None
        return self.active

    def prepare(self, epoch: int, start: int = 0) -> None:
        """Starts drawing `epoch`'s views from position `start` into the spare table (not the one
        FFCV reads)."""
        self.join()
        self.ahead, self.error, self.drawing = None, None, (epoch, start)
        self.stop.clear()
        self.thread = threading.Thread(target=self.run, args=(epoch, start), name=f"views-ahead-{epoch}-{start}",
                                       daemon=True)
        self.thread.start()

    def run(self, epoch: int, start: int) -> None:
        try:
            if self.fill(self.spare, epoch, start, self.stop):
                self.ahead = (epoch, start)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by activate()
            self.error = e

    def fill(self, table, epoch: int, start: int, stop: threading.Event | None) -> bool:
        """`table.fill` of the epoch's samples in chunks; False if `stop` was set on the way."""
        indices = self.order_of(epoch, start)
        for i in range(0, len(indices), CHUNK):
            if stop is not None and stop.is_set():
                return False
            table.fill(indices[i:i + CHUNK], self.aug, self.seed, epoch)
        return True

    def join(self) -> None:
        thread, self.thread = self.thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def close(self) -> None:
        """Stops and joins the thread (within one chunk, ~0.1 s); what it drew is dropped."""
        self.stop.set()
        self.join()
        self.ahead = None
