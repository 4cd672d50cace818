"""S3: a real S3 API (moto's server) on 127.0.0.1, reached by s3fs/boto3 through the standard
environment variables, exactly as a user's MinIO or AWS endpoint would be."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_client_environment(endpoint: str) -> dict[str, str]:
    """The standard variables that point boto3 and s3fs at `endpoint` with fake credentials."""
    return {"AWS_ACCESS_KEY_ID": "fake", "AWS_SECRET_ACCESS_KEY": "fake", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> Iterator[str]:
    """Point boto3/s3fs at the moto server via the environment; yields the endpoint URL."""
    import s3fs

    missing = tmp_path_factory.mktemp("aws") / "absent"  # keep ~/.aws profiles out of the tests
    settings = {
        **s3_client_environment(s3_server),
        "AWS_CONFIG_FILE": str(missing),
        "AWS_SHARED_CREDENTIALS_FILE": str(missing),
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "DITSWEEP_S3_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    # Cached S3FileSystem instances hold a client built for an earlier environment.
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"ditsweep-test-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    return name
