"""Shared fixtures.

S3: a real S3 API (moto's server) on 127.0.0.1, reached by s3fs/boto3 through the standard
environment variables, exactly as a user's MinIO or AWS endpoint would be.
"""

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


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> Iterator[str]:
    """Point boto3/s3fs at the moto server via the environment; yields the endpoint URL."""
    import s3fs

    missing = tmp_path_factory.mktemp("aws") / "absent"  # keep ~/.aws profiles out of the tests
    settings = {
        "AWS_ACCESS_KEY_ID": "fake",
        "AWS_SECRET_ACCESS_KEY": "fake",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ENDPOINT_URL_S3": s3_server,
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


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory) -> dict:
    """One finished tiny sweep (placement none/head x seed 0/1) in its own folder, launched through
    the CLI; shared by the tests that read a real sweep (report, MLflow UI)."""
    from mlflow.tracking import MlflowClient

    from tests.sweeps import TINY, ditsweep, runs_by_role, sqlite_uri, write_spec

    folder = tmp_path_factory.mktemp("finished_sweep")
    base = {**TINY, "train": {**TINY["train"], "steps": 2}}
    spec = write_spec(folder, name="realsweep", base=base,
                      grid={"attention.placement": ["none", "head"], "seed": [0, 1]})
    launched = ditsweep("launch", str(spec), cwd=folder)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    client = MlflowClient(tracking_uri=sqlite_uri(folder))
    runs = runs_by_role(client, "realsweep")
    parent = runs["sweep"][0]
    return {
        "folder": folder,
        "stdout": launched.stdout,
        "experiment_id": parent.info.experiment_id,
        "sweep": parent.info.run_name,
        "sweep_id": parent.data.tags["ditsweep.sweep_id"],
        "parent_run_id": parent.info.run_id,
        "trials": sorted(r.info.run_name for r in runs["trial"]),
    }


@pytest.fixture(scope="module")
def one_torch_thread():
    """Limit torch to one thread for a module, then restore the previous setting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
