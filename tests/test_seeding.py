"""The one seed derivation, the global-generator fork, and masks per optimizer step's global batch."""
import random

import numpy as np
import pytest
import torch

from simmim.core.seeding import STREAMS, derive_seed, derive_seeds, keyed_rng
from simmim.pipeline import MaskGenerator, ShardedSampler
from simmim.pipeline.loader import GlobalBatchMasks


def test_derive_seed_is_numpy_seed_sequence_and_separates_keys():
    assert derive_seed("masks", 3, 1, 2) == int(np.random.SeedSequence([3, STREAMS["masks"], 2, 1, 2])
                                               .generate_state(1, np.uint64)[0]) >> 1
    seeds = {derive_seed(s, seed, *key) for s in ("order", "masks", "step") for seed in (0, 1)
             for key in [(0,), (1,), (0, 1), (1, 0), (0, 0, 0)]}
    assert len(seeds) == 3 * 2 * 5  # no collisions, also for keys that differ only by trailing zeros
    assert all(0 <= s < 2 ** 63 for s in seeds) and derive_seed("dali", 0, 5, bits=31) < 2 ** 31
    with pytest.raises(KeyError):
        derive_seed("nope", 0)


def test_keyed_rng_is_a_function_of_the_key_and_restores_the_globals():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    before = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    draws = []
    for _ in range(2):
        with keyed_rng("step", 0, 4, 2, 0, 1):
            draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == before  # as if nothing ran
    with keyed_rng("step", 0, 4, 2, 0, 2):
        assert (random.random(), np.random.rand(), torch.rand(1).item()) != draws[0]  # another rank


@pytest.mark.parametrize("world_size,batch,accum", [(2, 4, 1), (1, 4, 2), (2, 2, 2), (4, 1, 2), (1, 1, 8)])
def test_masks_follow_the_sample_whatever_the_split_of_the_global_batch(world_size, batch, accum):
    """Global batch 8 = world_size x batch x accum: every sample (dataset index) gets the mask it gets at
    1 x 8 x 1, over two steps of an epoch."""
    gen, size, steps = MaskGenerator(64, 32, 0.5), 40, 2
    device = torch.device("cpu")

    def masks_by_index(w, b, a):
        out = {}
        for rank in range(w):
            sampler = ShardedSampler(size, rank, w, seed=7)
            sampler.set_epoch(3)
            idx = sampler.indices()
            masks = GlobalBatchMasks(gen, 7, 3, rank, w, b, device, a)
            for k in range(steps * a):  # this rank's micro-batches
                for i, m in zip(idx[k * b:(k + 1) * b], masks(k)):
                    out[i] = m
        return out

    want, got = masks_by_index(1, 8, 1), masks_by_index(world_size, batch, accum)
    assert want.keys() == got.keys() and len(want) == 8 * steps
    assert all(torch.equal(want[i], got[i]) for i in want)


def test_derive_seeds_is_derive_seed_vectorised():
    """Seeds of several words (run seeds past 2^32 and 2^63), keys of 0..2 leading ints, the ends of
    the last key's range, both widths; out of range is refused."""
    last = np.array([0, 1, 2, 99, 123_456, 1_281_166, 2 ** 32 - 1])
    for seed in (0, 7, 2 ** 40 + 3, 2 ** 63 + 5, 2 ** 64 - 1):
        for key in ((), (3,), (2 ** 33, 5)):
            for stream, bits in (("sample", 63), ("dali", 31)):
                want = [derive_seed(stream, seed, *key, int(i), bits=bits) for i in last]
                assert derive_seeds(stream, seed, *key, last=last, bits=bits).tolist() == want
    with pytest.raises(ValueError, match="2\\^32"):
        derive_seeds("sample", 0, 1, last=np.array([2 ** 32]))
