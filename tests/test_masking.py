import math

import pytest
import torch

from simmim.pipeline.masking import MaskGenerator, avg_dist, num_masked


@pytest.mark.parametrize("size,patch,ratio", [(192, 32, 0.6), (224, 32, 0.6), (192, 16, 0.3), (64, 32, 0.9),
                                              (96, 32, 0.7)])
def test_exact_count_shape_dtype(size, patch, ratio):
    gen = MaskGenerator(size, patch, ratio)
    m = gen.sample(257)
    cells = (size // patch) ** 2
    assert m.shape == (257, size // patch, size // patch) and m.dtype == torch.bool
    assert (m.flatten(1).sum(1) == math.ceil(round(ratio * cells, 9))).all()


def test_paper_counts():
    assert MaskGenerator(192, 32, 0.6).count == 22  # ceil(0.6 * 36)
    assert MaskGenerator(224, 32, 0.6).count == 30  # ceil(0.6 * 49)
    assert num_masked(10, 0.7) == 7  # 0.7 * 10 is 7.000000000000001 in floats


def test_rectangular_input():
    m = MaskGenerator((128, 192), 32, 0.5).sample(3)
    assert m.shape == (3, 4, 6) and (m.flatten(1).sum(1) == 12).all()


def test_per_cell_uniform_and_independent():
    gen = MaskGenerator(192, 32, 0.6)
    n = 20000
    m = gen.sample(n, generator=torch.Generator().manual_seed(1)).flatten(1).float()
    p = gen.count / gen.cells
    freq = m.mean(0)
    # binomial standard error ~ sqrt(p(1-p)/n) = 0.0035; 5 sigma bound on every cell
    assert (freq - p).abs().max() < 5 * math.sqrt(p * (1 - p) / n)
    # images are drawn independently: consecutive images agree on a cell as often as chance says
    agree = (m[1:] == m[:-1]).float().mean()
    assert abs(agree - (p * p + (1 - p) * (1 - p))) < 0.01
    # within an image, pairs of cells are exchangeable (sampling without replacement)
    pair = (m[:, 0] * m[:, 35]).mean()
    expect = gen.count * (gen.count - 1) / (gen.cells * (gen.cells - 1))
    assert abs(pair - expect) < 0.02


def test_reproducible_from_generator():
    gen = MaskGenerator()
    a = gen.sample(8, generator=torch.Generator().manual_seed(3))
    b = gen.sample(8, generator=torch.Generator().manual_seed(3))
    c = gen.sample(8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kwargs", [dict(input_size=190), dict(mask_patch_size=0), dict(mask_ratio=0.0),
                                    dict(mask_ratio=1.0), dict(mask_ratio=-0.2), dict(input_size=(192, 100))])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        MaskGenerator(**kwargs)


def brute_avg_dist(masks, cell):
    """Independent O(pixels^2) computation."""
    total, count = 0.0, 0
    for m in masks:
        pix = m.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
        ys, xs = torch.nonzero(pix, as_tuple=True)
        vy, vx = torch.nonzero(~pix, as_tuple=True)
        if len(vy) == 0:
            continue
        d = ((ys[:, None] - vy[None]).float() ** 2 + (xs[:, None] - vx[None]).float() ** 2).sqrt().amin(1)
        total += d.sum().item()
        count += len(d)
    return total / count


@pytest.mark.parametrize("size,cell,ratio", [(32, 4, 0.6), (48, 8, 0.3), (64, 16, 0.9), (40, 8, 0.5)])
def test_avg_dist_matches_brute_force(size, cell, ratio):
    masks = MaskGenerator(size, cell, ratio).sample(3, generator=torch.Generator().manual_seed(0))
    assert avg_dist(masks, cell) == pytest.approx(brute_avg_dist(masks, cell), rel=1e-5)


def test_avg_dist_simple_cases():
    # one masked 2x2-pixel cell in the corner: three pixels touch a visible one (1 px), the corner
    # pixel is 2 px away (straight down or right), so (1 + 1 + 1 + 2) / 4
    m = torch.tensor([[[True, False], [False, False]]])
    assert avg_dist(m, 2) == pytest.approx(1.25)
    # all masked: undefined
    assert math.isnan(avg_dist(torch.ones(1, 2, 2, dtype=torch.bool), 4))
    # larger cells lie further from visible pixels at the same ratio
    g = torch.Generator().manual_seed(0)
    small = avg_dist(MaskGenerator(192, 8, 0.6).sample(64, generator=g), 8)
    large = avg_dist(MaskGenerator(192, 32, 0.6).sample(64, generator=g), 32)
    assert large > 3 * small
