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
    config.addinivalue_line("markers", "slow: over ~20 s on a 2-core CPU; `make test-fast` leaves these out, "
                                       "`make test` (and CI) runs them")


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global random state (torch, numpy, random): unseeded test
    inputs are the same every run, so a failure reproduces."""
    import random

    import numpy as np

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """A small build of the embedded sample dataset (5 classes, 4 JPEGs per photo)."""
    from simmim.pipeline.sample_data import build_sample_dataset

    return build_sample_dataset(tmp_path_factory.mktemp("data") / "sample", per_photo=4, val_per_photo=1)


@pytest.fixture
def simmim_cmd():
    """The `simmim` console script, as setup.py installs it."""
    return [sys.executable, "-m", "simmim.cli"]


@pytest.fixture
def hostile(tmp_path) -> Path:
    """A class folder holding every odd-but-valid and every broken kind of file (helpers.py)."""
    from helpers import make_hostile

    return make_hostile(tmp_path / "hostile")


@pytest.fixture(scope="session")
def ramps(tmp_path_factory) -> Path:
    from helpers import make_ramps

    return make_ramps(tmp_path_factory.mktemp("ramps"))


@pytest.fixture(scope="session")
def _moto_server():
    """moto's S3-compatible server on 127.0.0.1 (a free port), for the whole session."""
    pytest.importorskip("moto.server", reason="moto[server] comes with the test extras")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._server.server_port}"
    server.stop()


@pytest.fixture
def s3_bucket(_moto_server, monkeypatch, request) -> str:
    """A fresh empty bucket on the local S3 server, named for the test; returns 's3://<bucket>'.

    The usual environment variables point boto3 (AWS_ENDPOINT_URL) and MosaicML streaming
    (S3_ENDPOINT_URL) at the server, here and in every subprocess the test starts."""
    import re

    import boto3

    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": _moto_server, "S3_ENDPOINT_URL": _moto_server}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-" + os.urandom(3).hex()
    boto3.client("s3", endpoint_url=_moto_server).create_bucket(Bucket=bucket)
    return f"s3://{bucket}"
