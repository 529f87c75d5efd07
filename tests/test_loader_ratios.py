"""`simmim bench loaders` on a few hundred images: each of our loaders against its library's plain
pipeline (torchvision's ImageFolder + RandomResizedCrop, FFCV's own decoder on the same .beton,
DALI's file reader + random-crop decoder), interleaved rounds, medians of per-round ratios.

Fails only when one of ours falls below half of its plain counterpart: wide enough for a loaded
2-core machine, narrow enough to catch a 2x regression. The ratio, not a time, is what is checked.
"""
import pytest

from simmim.pipeline.loaders import available

pytestmark = pytest.mark.slow


def test_no_loader_falls_below_half_of_its_plain_counterpart(tmp_path):
    from simmim.benchmarks import loaders

    backends = [b for b in ("torch", "ffcv", "dali") if available(b)]
    out = loaders.main(["--synthetic", "256", "--size", "192", "--batch", "16", "--workers", "2", "--rounds", "3",
                        "--backends", ",".join(backends), "--out", str(tmp_path)])
    ours = [r for r in out["rows"] if r["ours"]]
    assert {r["loader"] for r in ours} == set(backends)
    slow = {r["loader"]: r["ratios"]["x plain"] for r in ours if r["ratios"]["x plain"]["median"] < 0.5}
    assert not slow, f"below half of the plain pipeline (median [min, max] of per-round ratios): {slow}"
