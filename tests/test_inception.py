"""The FID Inception port (trainer.inception) and its weights file (trainer.fid_weights): weights layout,
loading, caching, preflight, and features.

The real weights cannot be downloaded here, so a file of random weights with the same keys and
shapes stands in for them (with its own sha256 prefix). Forward passes run at 299x299 on CPU
(about a second per image), so they use three images in all.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from tests.support.sweeps import free_port
from tests.support.weights import expected_state_dict_shapes
from trainer.fid import extract_features
from trainer.config import FID_WEIGHTS_FILENAME
from trainer.fid_weights import WeightsError, weights_available
from trainer.inception import (
    FIDInceptionE,
    FIDInceptionA,
    FIDInceptionC,
    FIDInceptionV3,
    load_fid_inception,
)

# torchvision's Inception-v3 without its auxiliary head and with 1000 classes has 23,834,568
# parameters; the FID network has 8 more classes of 2048 weights and a bias each.
TORCHVISION_INCEPTION_V3_NO_AUX_PARAMS = 23_834_568
FID_PARAMS = TORCHVISION_INCEPTION_V3_NO_AUX_PARAMS + 8 * (2048 + 1)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model(fid_weights) -> FIDInceptionV3:
    path, prefix = fid_weights
    return load_fid_inception(str(path), expected_sha256_prefix=prefix)


@pytest.fixture
def memory_fs():
    """fsspec's in-memory filesystem, emptied of this test's files afterwards."""
    fs = fsspec.filesystem("memory")
    root = "/ditsweep-test"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------


def test_hand_written_table_matches_the_module():
    table = expected_state_dict_shapes()
    module_shapes = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    assert sorted(set(table) ^ set(module_shapes)) == []
    mismatched = {k: (table[k], module_shapes[k]) for k in table if table[k] != module_shapes[k]}
    assert mismatched == {}


def test_table_has_the_known_keys_and_size():
    table = expected_state_dict_shapes()
    # 94 convolutions, each with a conv weight and four batch norm tensors, then fc.
    assert len(table) == 94 * 5 + 2
    assert table["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert table["Conv2d_1a_3x3.bn.running_var"] == (32,)
    assert table["Mixed_5b.branch1x1.conv.weight"] == (64, 192, 1, 1)
    assert table["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert table["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert table["Mixed_7a.branch3x3_2.conv.weight"] == (320, 192, 3, 3)
    assert table["Mixed_7c.branch3x3dbl_3b.bn.bias"] == (384,)
    assert table["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert table["fc.weight"] == (1008, 2048)
    assert table["fc.bias"] == (1008,)
    assert not any(k.startswith("AuxLogits") or k.endswith("num_batches_tracked") for k in table)
    learned = sum(
        int(np.prod(shape))
        for key, shape in table.items()
        if not key.endswith(("running_mean", "running_var"))
    )
    assert learned == FID_PARAMS


# ----------------------------------------------------------------------------------------------
# The TF-specific pooling of the FID blocks, against pooling written out here
# ----------------------------------------------------------------------------------------------


def pool_inside_image(x: torch.Tensor, how: str) -> torch.Tensor:
    """3x3 stride-1 mean or max over the neighbours that lie inside the image, by loops."""
    out = torch.empty_like(x)
    height, width = x.shape[-2:]
    for i in range(height):
        for j in range(width):
            window = x[..., max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].flatten(-2)
            out[..., i, j] = window.mean(-1) if how == "mean" else window.amax(-1)
    return out


@pytest.mark.parametrize(
    "block, in_channels, pool_channels, how",
    [
        (lambda: FIDInceptionA(192, pool_features=32), 192, 32, "mean"),
        (lambda: FIDInceptionC(768, channels_7x7=128), 768, 192, "mean"),
        (lambda: FIDInceptionE(1280, pool="avg"), 1280, 192, "mean"),
        (lambda: FIDInceptionE(2048, pool="max"), 2048, 192, "max"),
    ],
    ids=["Mixed_5b", "Mixed_6b", "Mixed_7b", "Mixed_7c"],
)
def test_pool_branch_pools_inside_the_image(block, in_channels, pool_channels, how):
    torch.manual_seed(0)
    module = block().eval()
    for p in module.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(1, in_channels, 5, 6)
    with torch.no_grad():
        got = module(x)[:, -pool_channels:]  # the pool branch is concatenated last
        want = module.branch_pool(pool_inside_image(x, how))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def test_loads_file_with_the_table_keys_strictly(fid_weights, model):
    path, _ = fid_weights
    saved = torch.load(path, weights_only=True)
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected_state_dict_shapes()
    loaded = model.state_dict()
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.running_var", "fc.bias"):
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_loads_a_file_that_also_carries_num_batches_tracked(fid_weights, tmp_path):
    # A file saved from nn.BatchNorm2d modules would carry these counters; either form loads.
    state_dict = torch.load(fid_weights[0], weights_only=True)
    for key in list(state_dict):
        if key.endswith(".bn.running_var"):
            state_dict[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    path = tmp_path / "with_counters.pth"
    torch.save(state_dict, path)
    model = load_fid_inception(str(path), expected_sha256_prefix=sha256_of(path)[:8])
    torch.testing.assert_close(
        model.Mixed_6a.branch3x3.bn.running_mean, state_dict["Mixed_6a.branch3x3.bn.running_mean"]
    )


def test_refuses_a_file_with_a_missing_key(fid_weights, tmp_path):
    state_dict = torch.load(fid_weights[0], weights_only=True)
    del state_dict["Mixed_7c.branch_pool.conv.weight"]
    path = tmp_path / "incomplete.pth"
    torch.save(state_dict, path)
    with pytest.raises(WeightsError, match="Mixed_7c.branch_pool.conv.weight"):
        load_fid_inception(str(path), expected_sha256_prefix=sha256_of(path)[:8])


def test_refuses_a_file_with_the_wrong_digest(fid_weights):
    path, _ = fid_weights
    digest = sha256_of(path)
    with pytest.raises(WeightsError) as info:
        load_fid_inception(str(path))  # expects the real file's 6726825d
    message = str(info.value)
    assert digest in message and str(path) in message
    assert "6726825d" in message and "eval.fid.weights=" in message


def test_missing_local_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / FID_WEIGHTS_FILENAME
    with pytest.raises(WeightsError, match=str(missing)):
        load_fid_inception(str(missing))


@pytest.mark.parametrize("scheme", ["memory", "file", "http"])
def test_remote_weights_are_downloaded_once_then_cached(
    fid_weights, memory_fs, tmp_path, scheme, request
):
    path, prefix = fid_weights
    fs, root = memory_fs
    if scheme == "memory":
        remote_path = f"{root}/releases/random_inception.pth"
        fs.pipe(remote_path, path.read_bytes())
        uri = f"memory://{remote_path}"
    elif scheme == "file":
        remote_copy = tmp_path / "remote" / "random_inception.pth"
        remote_copy.parent.mkdir()
        remote_copy.write_bytes(path.read_bytes())
        uri = remote_copy.as_uri()
    else:
        served, base = request.getfixturevalue("http_server")
        remote_copy = served / "random_inception.pth"
        remote_copy.write_bytes(path.read_bytes())
        uri = f"{base}/random_inception.pth"
    cache = tmp_path / "cache"

    load_fid_inception(uri, cache_dir=cache, expected_sha256_prefix=prefix)
    cached = cache / "weights" / "random_inception.pth"
    assert cached.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in cached.parent.iterdir()) == ["random_inception.pth"]

    # The remote copy is gone: the second load can only have used the cache.
    if scheme == "memory":
        fs.rm(remote_path)
    else:
        remote_copy.unlink()
    assert not weights_available(uri, cache_dir=tmp_path / "empty-cache")[0]
    again = load_fid_inception(uri, cache_dir=cache, expected_sha256_prefix=prefix)
    assert isinstance(again, FIDInceptionV3)
    assert weights_available(uri, cache_dir=cache)[0]


def test_remote_file_with_wrong_digest_is_refused_and_not_cached(memory_fs, tmp_path):
    fs, root = memory_fs
    fs.pipe(f"{root}/bad.pth", b"not the inception weights")
    uri = f"memory://{root}/bad.pth"
    digest = hashlib.sha256(b"not the inception weights").hexdigest()
    with pytest.raises(WeightsError, match=digest):
        load_fid_inception(uri, cache_dir=tmp_path)
    assert list((tmp_path / "weights").iterdir()) == []


def test_missing_remote_file_names_the_uri(memory_fs, tmp_path):
    _, root = memory_fs
    uri = f"memory://{root}/absent.pth"
    with pytest.raises(WeightsError, match=uri):
        load_fid_inception(uri, cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# Preflight
# ----------------------------------------------------------------------------------------------


def test_weights_available_for_a_local_file(fid_weights):
    path, _ = fid_weights
    ok, message = weights_available(str(path))
    assert ok and str(path) in message


def test_weights_unavailable_for_a_missing_path(tmp_path):
    missing = tmp_path / FID_WEIGHTS_FILENAME
    ok, message = weights_available(str(missing))
    assert not ok
    assert str(missing) in message and "eval.fid.weights=" in message


def test_weights_available_for_an_existing_fsspec_uri(memory_fs, tmp_path):
    fs, root = memory_fs
    fs.pipe(f"{root}/present.pth", b"x")
    assert weights_available(f"memory://{root}/present.pth", cache_dir=tmp_path)[0]
    ok, message = weights_available(f"memory://{root}/absent.pth", cache_dir=tmp_path)
    assert not ok and f"memory://{root}/absent.pth" in message


def test_weights_available_asks_an_http_server(http_server, tmp_path):
    served, base = http_server
    (served / FID_WEIGHTS_FILENAME).write_bytes(b"x")
    ok, message = weights_available(f"{base}/{FID_WEIGHTS_FILENAME}", cache_dir=tmp_path / "cache")
    assert ok, message
    ok, message = weights_available(f"{base}/missing.pth", cache_dir=tmp_path / "cache")
    assert not ok and "HTTP 404" in message


def test_weights_unavailable_for_an_unreachable_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/fid_weights/{FID_WEIGHTS_FILENAME}"
    start = time.monotonic()
    ok, message = weights_available(url, cache_dir=tmp_path, timeout_s=2.0)
    assert time.monotonic() - start < 5.0
    assert not ok
    assert url in message and "eval.fid.weights=" in message


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------


def test_features_are_deterministic_and_independent_of_batch_size(model):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    one_by_one = extract_features(model, images, batch_size=1, device="cpu")
    together = extract_features(model, images, batch_size=3, device="cpu")
    first_again = extract_features(model, images[:1], batch_size=1, device="cpu")

    assert together.shape == (3, 2048) and together.dtype == np.float32
    assert np.isfinite(together).all() and (together >= 0).all()  # averages of ReLU outputs
    np.testing.assert_array_equal(first_again, one_by_one[:1])
    scale = np.abs(together).max()
    np.testing.assert_allclose(one_by_one, together, rtol=1e-4, atol=1e-5 * scale)
    # Different images give different features (the network is not degenerate).
    assert np.abs(together[0] - together[1]).max() > 1e-3 * scale
