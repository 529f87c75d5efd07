"""The one seed derivation: every random stream of a run is keyed by (run seed, stream, key...).

A run's trajectory must not depend on how it got there (resume, world size, accumulation), so no
random draw may depend on what was drawn before it in the process. Every stream therefore starts
from `derive_seed(stream, seed, *key)`, where the key says which draw it is: (epoch,) for the
sample order, (epoch, index) for one sample's augmentation, (epoch, step) for one optimizer step's
masks, (epoch, step, micro, rank) for the noise inside one micro-step (drop path, mixup, ...).
The derivation is numpy's `SeedSequence`, which hashes the whole entropy list so that nearby keys
give unrelated seeds (no `seed * 1_000_003 + epoch` collisions); `derive_seeds` computes the same
seeds for many last keys at once (a whole epoch's samples, for FFCV's crop boxes).

Libraries that draw from a process-global generator (timm's DropPath, Mixup, RandomErasing and
RandAugment; torchvision's RandAugment) run inside `keyed_rng(...)`: the global generators of
Python, NumPy and torch (CPU and the given CUDA device) are saved, seeded from the key, and restored
on exit, so those draws are functions of the key and nothing outside sees a change.
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

# One id per stream: two streams never share a seed even for equal keys. Append only (changing an
# id changes every run's trajectory).
STREAMS = {"order": 1, "sample": 2, "masks": 3, "dali": 4, "step": 5, "loader": 6, "pages": 7, "figure": 8,
           "init": 9, "randaugment": 10, "device_augment": 11}


def derive_seed(stream: str, seed: int, *key: int, bits: int = 63) -> int:
    """A `bits`-bit seed (default fits torch.manual_seed and int64) for draw `key` of `stream`.

    stream: a name in STREAMS; seed: the run seed (train.seed); key: non-negative ints.
    Raises KeyError for an unknown stream."""
    # the key's length is part of the entropy: SeedSequence pads with zeros, so (0,) and (0, 0)
    # would otherwise collide
    entropy = [int(seed) % 2 ** 64, STREAMS[stream], len(key), *(int(k) % 2 ** 64 for k in key)]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return int(state) >> (64 - bits)


def torch_generator(stream: str, seed: int, *key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded by `derive_seed(stream, seed, *key)`."""
    return torch.Generator(device=device).manual_seed(derive_seed(stream, seed, *key))


@contextlib.contextmanager
def keyed_rng(stream: str, seed: int, *key: int, device: torch.device | str | None = None):
    """Seeds the global Python, NumPy and torch generators (CPU, and `device` if it is CUDA) from the
    key for the duration of the block; restores them afterwards. For third-party code that draws
    from the global generators."""
    s = derive_seed(stream, seed, *key)
    device = torch.device(device) if device is not None else None
    cuda = [device] if device is not None and device.type == "cuda" else []
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        random.seed(s)
        np.random.seed(s >> 31)  # NumPy's legacy seed takes 32 bits
        torch.default_generator.manual_seed(s)
        if cuda:
            torch.cuda.default_generators[cuda[0].index or 0].manual_seed(s)
        try:
            yield s
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# numpy's SeedSequence constants (numpy/random/bit_generator.pyx), for `derive_seeds`
_POOL, _INIT_A, _MULT_A, _INIT_B, _MULT_B = 4, 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _MASK = 0xCA01F9DD, 0x4973F715, 0xFFFFFFFF


def _words(n: int) -> list[int]:
    """SeedSequence's reading of a non-negative int: its 32-bit words, least significant first."""
    out = [n & _MASK]
    while n > _MASK:
        n >>= 32
        out.append(n & _MASK)
    return out


def derive_seeds(stream: str, seed: int, *key: int, last: np.ndarray, bits: int = 63) -> np.ndarray:
    """`derive_seed(stream, seed, *key, i, bits=bits)` for every i in `last` (ints in [0, 2^32)), as
    int64 (N,), in one vectorised pass: SeedSequence's hash (mix_entropy, then generate_state) on
    numpy uint32 arrays. Its multipliers do not depend on the data, so every lane runs the same
    steps. ~0.1 us a key instead of ~14 (tests/test_seeding.py checks equality)."""
    last = np.asarray(last, np.int64)
    if last.size and (last.min() < 0 or last.max() > _MASK):
        raise ValueError("derive_seeds: the last key must lie in [0, 2^32)")
    words = [w for v in (int(seed) % 2 ** 64, STREAMS[stream], len(key) + 1, *(int(k) % 2 ** 64 for k in key))
             for w in _words(v)]
    entropy = [np.full(last.shape, w, np.uint32) for w in words] + [last.astype(np.uint32)]
    shift = np.uint32(16)
    h = _INIT_A

    def hashmix(value):
        nonlocal h
        value = value ^ np.uint32(h)
        h = (h * _MULT_A) & _MASK
        value = value * np.uint32(h)
        return value ^ (value >> shift)

    def mix(x, y):
        r = np.uint32(_MIX_L) * x - np.uint32(_MIX_R) * y
        return r ^ (r >> shift)

    zero = np.zeros(last.shape, np.uint32)
    pool = [hashmix(entropy[i] if i < len(entropy) else zero) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL, len(entropy)):
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(entropy[src]))
    h, state = _INIT_B, []
    for i in range(2):  # generate_state(1, uint64): two 32-bit words, little-endian
        value = pool[i] ^ np.uint32(h)
        h = (h * _MULT_B) & _MASK
        value = value * np.uint32(h)
        state.append((value ^ (value >> shift)).astype(np.uint64))
    return ((state[0] | (state[1] << np.uint64(32))) >> np.uint64(64 - bits)).astype(np.int64)
