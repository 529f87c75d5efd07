"""The FFCV (and numba) internals the FFCV loader relies on, in one place.

FFCV 1.0 offers no public way to (1) give a `Loader` a custom sample order as an object we own,
(2) notice that its producer thread died (its `__next__` waits forever), (3) stop an epoch early
and free its memory, (4) collect a loader without numba printing a harmless traceback, (5) keep
its hands off torch's thread count, (6) read one stored image, or (7) hand its compiled decoder
per-sample data of ours (`ffcv_loader.ViewTable` replaces `Loader.reader.metadata`, which FFCV
passes to the decoder on every batch). Each function below (and that class) does one of those
through FFCV's attributes; `ATTRIBUTES` lists every one used, and tests/test_ffcv.py checks
them on a live loader, so an FFCV upgrade that renames one fails there rather than in a training run.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time

import numpy as np
import torch

from .decode import DecodeError

# Loader: the order objects `Loader.next_epoch`/`__iter__` read. EpochIterator (a Thread): the
# rest; current_stream exists only on CUDA, memory_context.executor.threads only with os_cache=False.
ATTRIBUTES = {"Loader": ("traversal_order", "first_traversal_order", "next_epoch", "reader"),
              "EpochIterator": ("output_queue", "terminate_event", "cuda_streams", "memory_context", "closed",
                                "close"),
              "EpochIterator on CUDA": ("current_stream",),
              "Compiler": ("set_num_threads", "num_threads"),
              "Reader": ("metadata", "alloc_table", "field_names")}


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


_threads_lock = threading.Lock()
_threads_kept = False


def keep_torch_threads() -> None:
    """FFCV's `Compiler.set_num_threads(n)` sets numba's thread count and torch's too; it runs at
    the import of `ffcv` (n = 1), in `Loader()` and at every epoch start (n = num_workers), the last
    in FFCV's producer thread, and torch's count is process-wide, so a training step's CPU ops
    would run on num_workers threads (or 1), changing under the trainer between epochs. Call this
    before FFCV is first imported: it imports it keeping torch's count, and replaces the method by
    one that sets numba's count only (thread-local in numba: each FFCV thread sets its own). Once
    per process, never at import of ours."""
    global _threads_kept
    with _threads_lock:
        if _threads_kept:
            return
        n = torch.get_num_threads()
        try:
            from ffcv.pipeline.compiler import Compiler
        finally:
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
        from numba import set_num_threads as numba_threads

        def set_num_threads(cls, n: int) -> None:
            if n < 1:
                n = os.cpu_count() or 1
            cls.num_threads = n
            numba_threads(n)

        Compiler.set_num_threads = classmethod(set_num_threads)
        _threads_kept = True


def read_image(path: str, reader, i: int) -> np.ndarray:
    """Sample i's image of the .beton at `path` (`reader` its ffcv Reader): uint8 (H, W, 3) RGB,
    decoded by FFCV's own decoder (libffcv's imdecode). DecodeError if it does not decode."""
    from ffcv.libffcv import imdecode


    field = reader.metadata[f"f{reader.field_names.index('image')}"][i]
    ptr, h, w = int(field["data_ptr"]), int(field["height"]), int(field["width"])
    sizes = reader.alloc_table["size"][reader.alloc_table["ptr"] == ptr]
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if len(sizes) == 0 or ptr + int(sizes[0]) > len(data):
        raise DecodeError(f"sample {i} of {path}: its data is not in the file")
    src = np.asarray(data[ptr:ptr + int(sizes[0])])
    if field["mode"] != 0:  # raw RGB
        if src.size < h * w * 3:
            raise DecodeError(f"sample {i} of {path}: {src.size} bytes for {w}x{h} raw pixels")
        return src[:h * w * 3].reshape(h, w, 3).copy()
    out = np.empty((h, w, 3), np.uint8)
    if imdecode(src, out, h, w, h, w, 0, 0, 1, 1, False, False) != 0:
        raise DecodeError(f"sample {i} of {path}: FFCV's decoder rejects it")
    return out
