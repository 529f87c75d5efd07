"""The FFCV (and numba) internals the FFCV loader relies on, in one place.

FFCV 1.0 offers no public way to (1) give a `Loader` a custom sample order as an object we own,
(2) notice that its producer thread died (its `__next__` waits forever), (3) stop an epoch early
and free its memory, or (4) collect a loader without numba printing a harmless traceback. Each
function below does one of those through FFCV's attributes; `ATTRIBUTES` lists every one used, and
tests/test_ffcv.py checks them on a live loader, so an FFCV upgrade that renames one fails there
rather than in a training run.
"""
from __future__ import annotations

import queue
import sys
import threading
import time

# Loader: the order objects `Loader.next_epoch`/`__iter__` read. EpochIterator (a Thread): the
# rest; current_stream exists only on CUDA, memory_context.executor.threads only with os_cache=False.
ATTRIBUTES = {"Loader": ("traversal_order", "first_traversal_order", "next_epoch"),
              "EpochIterator": ("output_queue", "terminate_event", "cuda_streams", "memory_context", "closed",
                                "close"),
              "EpochIterator on CUDA": ("current_stream",)}


def install_order(loader, order) -> None:
    """Makes `loader` (an ffcv Loader) draw its sample order from `order`, an object with
    `sample_order(epoch) -> np.ndarray of uint64 indices` (FFCV takes custom orders only as classes
    it instantiates itself; ours carries rank, seed and resume state)."""
    loader.traversal_order = order
    loader.first_traversal_order = order.sample_order(0)


def next_batch(epoch, poll: float = 0.5):
    """FFCV's EpochIterator.__next__, but raising if the producer thread died (FFCV would wait
    forever); None at the end of the epoch."""
    while True:
        try:
            item = epoch.output_queue.get(timeout=poll)
            break
        except queue.Empty:
            if not epoch.is_alive() and epoch.output_queue.empty():
                raise RuntimeError("the FFCV loader thread stopped with an error (printed above)") from None
    if item is None:
        return None
    slot, result = item
    stream = epoch.cuda_streams[slot]
    if stream is not None:
        epoch.current_stream.wait_stream(stream)
    return result


def close_epoch(epoch, timeout: float = 10.0) -> None:
    """Stops FFCV's producer thread and frees its epoch memory. The producer checks for the stop
    request only while its output queue is full (it gives up a put after 0.5 s); its last put, of
    the end marker, waits without limit, so a queue that stays full is given room once."""
    epoch.terminate_event.set()
    deadline = time.monotonic() + timeout
    while epoch.is_alive() and time.monotonic() < deadline:
        epoch.join(0.6)
        if epoch.is_alive() and epoch.output_queue.full():
            try:
                epoch.output_queue.get_nowait()
            except queue.Empty:
                pass
    epoch.close()
    epoch.closed = True  # FFCV's close() never sets it, so its __del__ would release the pages again
    # os_cache=False: the page-reader threads got their stop marker in close(); wait for them
    for reader in getattr(getattr(epoch.memory_context, "executor", None), "threads", ()):
        reader.join(max(0.0, deadline - time.monotonic()))


_hook_lock = threading.Lock()
_hook_installed = False


def is_numba_finalizer_noise(unraisable) -> bool:
    """When a Loader's compiled pipeline is garbage-collected, numba's dispatcher finalizer raises
    a harmless KeyError for FFCV's dynamically built functions (numba 0.6x)."""
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (unraisable.exc_type is KeyError and tb is not None
            and tb.tb_frame.f_code.co_filename.endswith("numba/core/dispatcher.py"))


def quiet_numba_finalizer() -> None:
    """Filters exactly that one report out of `sys.unraisablehook` (everything else goes to the
    hook that was installed before). Process-wide, so it is installed on first use of an FFCV
    loader, once, never at import."""
    global _hook_installed
    with _hook_lock:
        if _hook_installed:
            return
        previous = sys.unraisablehook

        def hook(unraisable):
            if not is_numba_finalizer_noise(unraisable):
                previous(unraisable)

        sys.unraisablehook = hook
        _hook_installed = True
