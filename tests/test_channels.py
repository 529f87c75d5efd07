"""Grey and multi-channel data (data.channels, data.mean / data.std, `simmim scan --stats`)."""
import json

import numpy as np
import pytest

from simmim.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from simmim.pipeline.errors import ConfigError
from simmim.pipeline.stats import ChannelMoments, normalization, stats_path
from simmim.trainer.config import load_config


@pytest.mark.parametrize("overrides,match", [
    (["data.channels=1", "data.mean=[0.5,0.5]", "data.std=[0.2,0.2]"], "data.mean has 2 values for data.channels=1"),
    (["data.channels=4", "data.mean=[0.5,0.5,0.5,0.5]"], "data.mean and data.std are set together"),
    (["data.std=[0.2,0,0.2]", "data.mean=[0.5,0.5,0.5]"], "config key 'data.std' must be > 0"),
    (["data.channels=0"], "config key 'data.channels' must be > 0"),
    (["data.channels=5", "data.backend=ffcv"], "data.backend=ffcv reads 1 or 3-channel images"),
    (["data.channels=2", "data.backend=dali"], "data.backend=dali reads 1 or 3-channel images"),
])
def test_channel_options_are_checked_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_channel_options_load():
    c = load_config(None, ["data.channels=5", "data.mean=[0.1,0.2,0.3,0.4,0.5]", "data.std=[1,1,1,1,2]"])
    assert c.data.channels == 5 and c.data.std == [1.0, 1.0, 1.0, 1.0, 2.0]
    assert load_config(None, ["data.channels=1", "data.backend=dali"]).data.channels == 1


def test_normalization_sources(tmp_path):
    folder = tmp_path / "xray"
    folder.mkdir()
    assert normalization(3, [], [], folder) == (IMAGENET_MEAN, IMAGENET_STD, "ImageNet's")
    assert normalization(1, [0.3], [0.2], folder)[:2] == ((0.3,), (0.2,))
    with pytest.raises(ConfigError, match=r"run `simmim scan .*xray --stats --channels 1`"):
        normalization(1, [], [], folder)
    stats = stats_path(folder)
    assert stats == tmp_path / "xray.clean.stats.json"
    stats.write_text(json.dumps({"mean": [0.25], "std": [0.125]}))
    assert normalization(1, [], [], folder) == ((0.25,), (0.125,), str(stats))
    with pytest.raises(ConfigError, match="holds 1 channels, data.channels is 3"):
        normalization(3, [], [], folder)
    listed = tmp_path / "train.clean.txt"
    listed.write_text("a.png\n")
    assert stats_path(listed) == tmp_path / "train.clean.stats.json"


def test_channel_moments_match_numpy():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((5, 7), (11, 3), (1, 1), (40, 30))]
    m = ChannelMoments(3)
    for img in images:
        m.add_image(img, 255)
    every = np.concatenate([img.reshape(-1, 3) for img in images]).astype(np.float64) / 255
    np.testing.assert_allclose(m.mean, every.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.std, every.std(0), rtol=1e-12)
    assert m.count == len(every)
