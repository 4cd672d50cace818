"""FID in a sweep: the weights preflight of `launch`, and a tiny sweep that logs fid, kid, the sample
grid and the attention locality of its trial.

The real Inception weights cannot be downloaded here: a file of random weights with the same layout
stands in, with `eval.fid.weights_sha256` set to that file's own sha256 prefix.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from orchestrator.plan import check_fid_weights
from orchestrator.spec import SpecError, expand, load_spec
from tests.support.sweeps import ditsweep, free_port, runs_by_role, sqlite_uri, tiny_config, write_spec
from trainer.config import FID_WEIGHTS_URL

BASE = tiny_config(
    {"train.steps": 2, "train.log_every": 1, "eval.psnr_gap.images": 4,
     "eval.locality": {"images": 2, "timesteps": [500]}},
    drop=("eval.every",),
)
DEFAULT_WEIGHTS_HOST = urlsplit(FID_WEIGHTS_URL).hostname


def fid_base(weights: str, sha256_prefix: str = "6726825d") -> dict:
    fid = {"enabled": True, "samples": 3, "steps": 2, "batch_size": 8, "weights": weights,
           "weights_sha256": sha256_prefix}
    return {**BASE, "eval": {**BASE["eval"], "fid": fid}}


def trials_of(folder: Path, base: dict):
    return expand(load_spec(write_spec(folder, name="fidcheck", base=base, grid={"seed": [0, 1]})))


# ---------------------------------------------------------------------------------------------
# Preflight


def test_the_contact_recorder_sees_a_request(network_contacts, http_server):
    """The check the two tests below rely on: a request this process makes is recorded."""
    import urllib.request

    urllib.request.urlopen(http_server.url + "/", timeout=10).read()
    assert "127.0.0.1" in network_contacts.hosts and http_server.requests == ["/"]


def test_preflight_accepts_a_local_file_with_the_expected_digest(tmp_path, fid_weights, network_contacts):
    path, prefix = fid_weights
    check_fid_weights(trials_of(tmp_path, fid_base(str(path), prefix)))
    assert DEFAULT_WEIGHTS_HOST not in network_contacts.hosts and not network_contacts.hosts


def test_preflight_ignores_trials_without_fid(tmp_path, network_contacts):
    check_fid_weights(trials_of(tmp_path, BASE))  # the default weights URI is never asked
    assert DEFAULT_WEIGHTS_HOST not in network_contacts.hosts and not network_contacts.hosts


def test_preflight_names_a_missing_file_and_how_to_supply_it(tmp_path):
    missing = tmp_path / "nowhere" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(SpecError) as err:
        check_fid_weights(trials_of(tmp_path, fid_base(str(missing))))
    message = str(err.value)
    assert str(missing) in message and FID_WEIGHTS_URL in message and "eval.fid.weights=" in message


def test_preflight_refuses_a_file_with_the_wrong_digest(tmp_path, fid_weights):
    path, _ = fid_weights
    with pytest.raises(SpecError, match="sha256"):
        check_fid_weights(trials_of(tmp_path, fid_base(str(path))))  # expects 6726825d


def test_launch_with_unreachable_weights_exits_2_before_anything_starts(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}/weights/pt_inception-2015-12-05-6726825d.pth"
    spec = write_spec(tmp_path, name="noweights", base=fid_base(uri), grid={"attention.placement": ["head"]})
    result = ditsweep("launch", str(spec), cwd=tmp_path, env={"DITSWEEP_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2, result.stdout + result.stderr
    assert uri in result.stderr and "eval.fid.weights=" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "ditsweep_results").exists()


# ---------------------------------------------------------------------------------------------
# A sweep with FID


@pytest.mark.slow
def test_sweep_with_fid_logs_fid_kid_samples_and_locality(tmp_path, fid_weights):
    path, prefix = fid_weights
    spec = write_spec(tmp_path, name="fidsweep", base=fid_base(str(path), prefix),
                      grid={"attention.placement": ["head"]})
    result = ditsweep("launch", str(spec), cwd=tmp_path, env={"DITSWEEP_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stdout + result.stderr

    client = MlflowClient(tracking_uri=sqlite_uri(tmp_path))
    (run,) = runs_by_role(client, "fidsweep")["trial"]
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert {"fid", "kid", "kid_std", "psnr_gap"} <= set(metrics)
    assert np.isfinite([metrics["fid"], metrics["kid"], metrics["kid_std"]]).all() and metrics["fid"] > 0
    # Head placement: block 0 has a 3x3 window, so all its attention stays inside 3x3.
    assert metrics["attn_local3.block_0"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["attn_distance.block_0"] <= 2**0.5 + 1e-6
    assert {f"attn_distance.block_{b}" for b in range(12)} <= set(metrics)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples.png", "samples.npy", "attn_locality.png", "psnr_curve.png"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "samples.npy", str(tmp_path / "download"))
    samples = np.load(local)
    assert samples.dtype == np.uint8 and samples.shape == (4, 8, 8, 1)
    assert len(list((tmp_path / "cache" / "fid_stats").glob("*.npz"))) == 1  # reference features cached
