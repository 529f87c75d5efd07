import os
import sys
from pathlib import Path

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before import.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # slow tests run by default (`pytest tests`, `make test`: both tiers, as CI does);
    # `make test-fast` (-m "not slow") leaves them out, `make test-slow` (-m slow) runs them alone
    config.addinivalue_line("markers", "slow: over ~20 s on 2 cores (multi-process FSDP2 / DCP, dry runs)")


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """A small build of the embedded sample dataset (5 classes, 4 JPEGs per photo)."""
    from simmim.pipeline.sample_data import build_sample_dataset

    return build_sample_dataset(tmp_path_factory.mktemp("data") / "sample", per_photo=4, val_per_photo=1)


@pytest.fixture
def simmim_cmd():
    return [sys.executable, "-m", "simmim.trainer.cli"]


@pytest.fixture
def hostile(tmp_path) -> Path:
    """A class folder holding every odd-but-valid and every broken kind of file (helpers.py)."""
    from helpers import make_hostile

    return make_hostile(tmp_path / "hostile")


@pytest.fixture(scope="session")
def ramps(tmp_path_factory) -> Path:
    from helpers import make_ramps

    return make_ramps(tmp_path_factory.mktemp("ramps"))
