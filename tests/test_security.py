"""Security: untrusted files and names cannot run code or reach outside what they name. A spec's
YAML cannot build Python objects, a checkpoint cannot unpickle one, and a sweep id (which goes into
MLflow's search filter and a folder name) cannot carry a quote or a path."""

from __future__ import annotations

import os

import pytest

from tests.support.sweeps import invoke


def test_yaml_is_loaded_safely(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    result, _ = invoke(tmp_path, monkeypatch, "launch", str(spec))
    assert result.exit_code == 2
    assert not marker.exists()


def test_checkpoints_load_with_weights_only(tmp_path):
    """A checkpoint that smuggles in a pickled object is refused, not executed."""
    import torch

    from trainer.train import CHECKPOINT_FILE, load_checkpoint

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save({"step": 1, "payload": Payload()}, folder / CHECKPOINT_FILE)
    assert load_checkpoint(folder) is None
    assert not marker.exists()


@pytest.mark.parametrize("command", ["status", "resume", "report"])
def test_a_sweep_id_that_new_sweep_id_cannot_make_exits_2(tmp_path, monkeypatch, command):
    """A sweep id goes into MLflow's search filter and a folder name: a quote or a path is refused."""
    for bad in ("x' or '1'='1", "../../etc", "a" * 5000):
        result, written = invoke(tmp_path, monkeypatch, command, bad)
        assert result.exit_code == 2, result.output
        assert "is not a sweep id" in result.stderr and len(result.stderr) < 1000, result.stderr
        assert written == set()
