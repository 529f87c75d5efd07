"""`ViewsAhead`: the next epoch's training views drawn on a thread equal the ones drawn at the epoch
start, are used only for the (epoch, start) they were drawn for, and the thread's errors and
lifetime stay the loader's. On a stand-in table (no FFCV): tests/test_views.py runs the FFCV loader."""
import time

import numpy as np
import pytest

from simmim.pipeline import Augmentation
from simmim.pipeline import views_ahead
from simmim.pipeline.augment import sample_views
from simmim.pipeline.views_ahead import ViewsAhead

SEED = 3
N = 500


class Table:
    """`ffcv_loader.ViewTable`'s fill on a plain (N, 5) array."""

    def __init__(self, widths, heights):
        self.widths, self.heights, self.rows = widths, heights, np.full((N, 5), -1, np.int32)

    def fill(self, indices, aug, seed, epoch):
        self.rows[indices] = sample_views(self.widths[indices], self.heights[indices], indices, aug, seed, epoch)


def order_of(epoch, start):
    return np.random.default_rng(epoch).permutation(N)[start:]


@pytest.fixture
def ahead(monkeypatch):
    monkeypatch.setattr(views_ahead, "CHUNK", 64)  # several chunks, so the stop request is looked at
    rng = np.random.default_rng(0)
    widths, heights = rng.integers(20, 400, N), rng.integers(20, 400, N)
    va = ViewsAhead((Table(widths, heights), Table(widths, heights)), order_of, Augmentation(size=32), SEED)
    yield va
    va.close()


def synchronous(va, epoch, start):
    table = Table(va.active.widths, va.active.heights)
    table.fill(order_of(epoch, start), va.aug, SEED, epoch)
    return table.rows


def test_next_epoch_is_drawn_ahead_and_equals_the_synchronous_draw(ahead):
    first = ahead.activate(0, 0)
    assert ahead.precomputed == 0 and np.array_equal(first.rows, synchronous(ahead, 0, 0))
    ahead.prepare(1)
    second = ahead.activate(1, 0)
    assert ahead.precomputed == 1 and second is not first  # the spare, filled by the thread
    assert np.array_equal(second.rows, synchronous(ahead, 1, 0))
    assert not np.array_equal(second.rows, first.rows)


@pytest.mark.parametrize("epoch, start", [(1, 128), (2, 0)])
def test_a_resume_or_a_jump_is_drawn_at_the_epoch_start(ahead, epoch, start):
    ahead.activate(0, 0)
    ahead.prepare(1)
    table = ahead.activate(epoch, start)
    assert ahead.precomputed == 0
    want = synchronous(ahead, epoch, start)
    drawn = order_of(epoch, start)
    assert np.array_equal(table.rows[drawn], want[drawn])


def test_an_error_in_the_thread_is_raised_at_the_next_epoch_start(ahead):
    ahead.activate(0, 0)

    def broken(indices, aug, seed, epoch):
        raise ValueError("bad size")

    ahead.spare.fill = broken
    ahead.prepare(1)
    with pytest.raises(ValueError, match="bad size"):
        ahead.activate(1, 0)
    del ahead.spare.fill
    assert np.array_equal(ahead.activate(1, 0).rows[order_of(1, 0)], synchronous(ahead, 1, 0)[order_of(1, 0)])


def test_close_stops_the_thread_within_a_chunk(ahead):
    slow, chunks = ahead.spare.fill, []

    def fill(*args):
        chunks.append(1)
        time.sleep(0.2)
        slow(*args)

    ahead.spare.fill = fill
    ahead.prepare(1)
    thread = ahead.thread
    assert thread.daemon and thread.is_alive()
    ahead.close()
    assert not thread.is_alive() and len(chunks) < 8  # stopped between chunks, not after all 8
    ahead.activate(1, 0)
    assert ahead.precomputed == 0  # what it drew is not used
