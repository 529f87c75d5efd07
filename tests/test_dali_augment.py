"""pipeline/dali_augment.py: DALI's own RandAugment, from the timm spec, in a CPU-only pipeline
(device_id=None): it runs on the CPU here, keeps shapes and dtype, and follows the pipeline seed."""
import warnings

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")
from simmim.pipeline.dali_augment import dali_rand_augment  # noqa: E402
from simmim.pipeline.rand_augment import parse_rand_augment  # noqa: E402

IMAGES = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(16)]


def run(spec, seed, images=IMAGES):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, enable_conditionals=True, seed=seed)
    def pipe():
        x = fn.external_source(source=lambda: images, layout="HWC", dtype=types.UINT8)
        return dali_rand_augment(x, parse_rand_augment(spec), (32, 32))

    with warnings.catch_warnings():  # DALI's auto_aug calls its own deprecated fn.experimental.equalize
        warnings.simplefilter("ignore", DeprecationWarning)
        p = pipe()
        p.build()
        (out,) = p.run()
    return [np.array(out.at(i)) for i in range(len(images))]


def test_dali_rand_augment_runs_on_the_cpu_and_is_seeded():
    a = run("rand-m9-mstd0.5-inc1", seed=1)
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in a)
    changed = sum(not np.array_equal(o, i) for o, i in zip(a, IMAGES))
    assert changed >= 12  # two ops from 14 (one is identity) per image
    assert all(np.array_equal(x, y) for x, y in zip(a, run("rand-m9-mstd0.5-inc1", seed=1)))
    assert not all(np.array_equal(x, y) for x, y in zip(a, run("rand-m9-mstd0.5-inc1", seed=2)))
    weak = run("rand-n1-m0-inc1", seed=1)  # magnitude 0: only the magnitude-free ops change an image
    assert sum(not np.array_equal(o, i) for o, i in zip(weak, IMAGES)) < changed
