"""Fixtures shared by the keyed-state acceptance suite.

* ``backend_name`` / ``make_backend``: one run per registered backend (tests/backends.py).
* ``clock``: a ``statecore.ManualClock(0)``.
* ``kb``: a keyed state backend (max_parallelism=128, the manual clock), closed afterwards.
* ``s3_server`` (session) / ``s3_options``: moto's ThreadedMotoServer on 127.0.0.1 and a fresh
  bucket with the s3fs ``storage_options`` that reach it (skipped without moto[server]/s3fs).
* hypothesis profiles: ``ci`` (default) and ``soak`` (``STATECORE_SOAK=1``).
"""

import itertools
import logging
import os
import sys
import uuid

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import statecore  # noqa: E402
from backends import BACKENDS  # noqa: E402

SOAK = os.environ.get("STATECORE_SOAK") == "1"

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=300,
    stateful_step_count=50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "soak",
    deadline=None,
    max_examples=5000,
    stateful_step_count=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("soak" if SOAK else "ci")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (subprocesses, large inputs)")


@pytest.fixture(params=sorted(BACKENDS))
def backend_name(request):
    return request.param


@pytest.fixture
def make_backend(backend_name, tmp_path):
    """A factory for fresh backends of the parametrized type, each in its own directory."""
    counter = itertools.count()

    def make():
        path = tmp_path / f"backend{next(counter)}"
        path.mkdir()
        return BACKENDS[backend_name](path)

    return make


@pytest.fixture
def clock():
    return statecore.ManualClock(0)


@pytest.fixture
def kb(make_backend, clock):
    keyed = make_backend().create_keyed_state_backend(max_parallelism=128, clock=clock)
    yield keyed
    keyed.close()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (never 0.0.0.0), port chosen by the OS."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] not installed (pip install 'moto[server]')")
    pytest.importorskip("s3fs", reason="s3fs not installed (pip install s3fs)")
    pytest.importorskip("boto3", reason="boto3 not installed (comes with moto)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_options(s3_server):
    import boto3
    bucket = f"sc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    opts = {"anon": False, "key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_server}}
    return bucket, opts
