"""Stand-in FID Inception weights: random weights in the real file's layout (the real weights cannot
be downloaded in tests)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory) -> tuple[Path, str]:
    """(path, sha256 prefix) of a random-weights file laid out like pt_inception-2015-12-05-6726825d.pth
    (the real weights cannot be downloaded in tests)."""
    import torch

    from tests.support.weights import random_fid_state_dict

    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(random_fid_state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()[:8]
