"""Shared fixtures: one Ray cluster, one Prefect harness, one S3 server per session.

Environment is set here, before any test module imports Prefect or Ray,
because both read their settings at import time (and Ray workers inherit the
driver's environment, which is how they get the fake S3 credentials).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="deit-tests-"))
os.environ.update({
    "PREFECT_HOME": str(_SESSION_TMP / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "HF_HOME": str(_SESSION_TMP / "hf"),
    "DEIT_SCORING_CACHE": str(_SESSION_TMP / "cache"),
    # moto accepts any credentials; s3fs needs some to sign requests
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "RAY_AUTH_MODE": "disabled",
})
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("PREFECT_API_URL", None)

TINY_MODEL = "facebook/deit-tiny-distilled-patch16-224"
# The real DeiT-tiny-distilled architecture and preprocessing, made small where
# the check is about logic. A wider weight init makes the random classifier's
# scores spread out, so top-k order is decided by clear margins, not ties.
TINY_OVERRIDES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, initializer_range=0.2)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def photos(session_tmp) -> Path:
    """Real photographs shipped by scikit-learn and scikit-image, copied byte for byte."""
    import sklearn.datasets
    import skimage.data

    out = session_tmp / "photos"
    out.mkdir()
    sk = Path(sklearn.datasets.__file__).parent / "images"
    ski = Path(skimage.data.__path__[0])
    for src in [sk / "china.jpg", sk / "flower.jpg", ski / "astronaut.png", ski / "chelsea.png",
                ski / "coffee.png", ski / "rocket.jpg", ski / "camera.png", ski / "logo.png"]:
        shutil.copy(src, out / src.name)
    return out


@pytest.fixture(scope="session")
def image_dir(session_tmp, photos) -> Path:
    """Photos + generated images + broken files, in nested folders, plus non-images."""
    from flows.demo import generate_sample_images

    root = session_tmp / "images"
    shutil.copytree(photos, root / "photos")
    generate_sample_images(root / "generated" / "deeper", 6, seed=1)
    (root / "notes.txt").write_text("not an image and not listed")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(session_tmp) -> Path:
    from deit_model import create_random_checkpoint

    return create_random_checkpoint(TINY_MODEL, session_tmp / "ckpt-tiny", seed=0, **TINY_OVERRIDES)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs, shared by the session."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    """The session cluster's GCS address: ``RAY_ADDRESS`` for a process that is to join it."""
    return ray_cluster.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto server mode) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3fs_client(s3_server):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_server, use_listings_cache=False)


@pytest.fixture
def s3_bucket(s3fs_client, request) -> str:
    """A fresh bucket per test."""
    name = "test-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{os.getpid()}"
    s3fs_client.mkdir(name)
    return name
