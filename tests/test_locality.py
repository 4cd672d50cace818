"""trainer.locality: per-block attention distance and neighbourhood shares, on tiny random DiTs."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.attention import window_mask
from trainer.diffusion import linear_schedule
from trainer.locality import attention_locality, row_sums, token_geometry
from trainer.records import by_block
from trainer.model import DiT

GRID = 8


def tiny_dit(windows: list[int | None], seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(image_size=GRID, in_channels=1, depth=len(windows), width=32, heads=2, windows=windows)
    return model.eval()


def held_out(count: int = 3) -> torch.Tensor:
    return torch.rand(count, 1, GRID, GRID, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_a_3x3_window_keeps_all_attention_inside_it_and_a_global_block_does_not():
    model = tiny_dit([3, 7, None])
    metrics = attention_locality(model, linear_schedule(100), held_out(), [10, 90])

    # Masked keys get exactly zero weight, so nothing is outside the window: the shares are 1 whatever
    # the float32 softmax rows sum to (they are normalized in float64).
    assert metrics["attn_local3.block_0"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["attn_local7.block_0"] == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < metrics["attn_distance.block_0"] <= math.sqrt(2) + 1e-9  # float64 after normalization

    assert metrics["attn_local7.block_1"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["attn_local3.block_1"] < 0.9
    assert metrics["attn_distance.block_1"] <= 3 * math.sqrt(2) + 1e-9

    assert metrics["attn_local3.block_2"] < 0.5  # 9 of 64 keys; random weights attend all over
    assert metrics["attn_local7.block_2"] < 1.0
    assert metrics["attn_distance.block_2"] > metrics["attn_distance.block_1"] > metrics["attn_distance.block_0"]
    assert set(metrics) == {f"attn_{m}.block_{b}" for m in ("distance", "local3", "local7") for b in range(3)}
    assert all(value <= 1.0 for key, value in metrics.items() if key.startswith("attn_local"))


def test_a_share_never_exceeds_one_even_when_float32_rows_sum_above_one():
    distance, near = token_geometry((GRID, GRID))
    n = GRID * GRID
    # Rows of a 3x3-window softmax, scaled so each sums to 1 + 1e-6 in float32 (a float32 softmax
    # row sums to 1 only up to rounding; on some CPUs above it). Everything is inside the window.
    logits = torch.randn(2, 2, n, n, generator=torch.Generator().manual_seed(3))
    logits = logits.masked_fill(~window_mask(GRID, GRID, 3), float("-inf"))
    probs = (torch.softmax(logits, dim=-1) * (1 + 1e-6)).float()
    assert (probs.sum(-1) > 1.0).all()
    sums = row_sums(probs, distance, near)
    rows = probs.shape[0] * probs.shape[1] * n
    shares = sums[1:] / rows
    assert (shares <= 1.0).all(), shares
    assert shares.tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    # The distance is a weighted mean over the row's own mass, not inflated by the excess.
    assert 0.0 < float(sums[0] / rows) <= math.sqrt(2)


def test_shares_of_partly_outside_rows_match_a_float64_reference():
    distance, near = token_geometry((GRID, GRID))
    n = GRID * GRID
    probs = torch.softmax(torch.randn(1, 2, n, n, generator=torch.Generator().manual_seed(4)), dim=-1)
    sums = row_sums(probs.float(), distance, near)
    p64 = probs.double() / probs.double().sum(-1, keepdim=True)
    rows = 2 * n
    assert float(sums[0]) / rows == pytest.approx(float((p64 * distance).sum()) / rows, rel=1e-12)
    for j, k in enumerate((3, 7), start=1):
        assert float(sums[j]) / rows == pytest.approx(float((p64 * near[k]).sum()) / rows, rel=1e-12)


def test_uniform_attention_gives_the_mean_distance_over_the_allowed_keys():
    model = tiny_dit([5, None])
    for block in model.blocks:  # zero queries: every allowed key gets the same weight
        width = block.attn.qkv.in_features
        with torch.no_grad():
            block.attn.qkv.weight[:width].zero_()
            block.attn.qkv.bias[:width].zero_()
    metrics = attention_locality(model, linear_schedule(100), held_out(2), [50])

    distance, near = token_geometry((GRID, GRID))
    window5 = window_mask(GRID, GRID, 5).double()
    expected_local = ((distance * window5).sum(1) / window5.sum(1)).mean().item()
    # The maps are float32 softmaxes: equal to about 1e-7.
    assert metrics["attn_distance.block_0"] == pytest.approx(expected_local, rel=1e-6)
    assert metrics["attn_distance.block_1"] == pytest.approx(distance.mean().item(), rel=1e-6)
    assert metrics["attn_local3.block_1"] == pytest.approx(near[3].mean().item(), rel=1e-6)
    assert metrics["attn_local7.block_1"] == pytest.approx(near[7].mean().item(), rel=1e-6)


def test_attention_probs_are_what_the_layer_applies():
    model = tiny_dit([3, None])
    x = torch.randn(2, GRID * GRID, 32, generator=torch.Generator().manual_seed(2))
    for block in model.blocks:
        attn = block.attn
        probs = attn.attention_probs(x)  # (B, heads, N, N)
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
        v = attn.qkv(x).reshape(2, GRID * GRID, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]  # (B, heads, N, head_dim)
        by_hand = attn.proj((probs @ v).transpose(1, 2).reshape(2, GRID * GRID, 32))
        torch.testing.assert_close(by_hand, attn(x, "dense"), rtol=1e-4, atol=1e-5)


def test_hooks_are_removed_and_the_model_is_unchanged():
    model = tiny_dit([3, None])
    x, t = held_out(2), torch.tensor([5, 50])
    before = model(x, t)
    attention_locality(model, linear_schedule(100), held_out(), [10])
    assert all(not block.attn._forward_pre_hooks for block in model.blocks)
    torch.testing.assert_close(model(x, t), before)


def test_by_block_orders_blocks_numerically():
    metrics = {f"attn_{m}.block_{b}": float(b) + (0.5 if m != "distance" else 0.0)
               for m in ("distance", "local3", "local7") for b in (10, 2, 0)}
    metrics["loss"] = 1.0
    assert by_block(metrics) == {"distance": [0.0, 2.0, 10.0], "local3": [0.5, 2.5, 10.5], "local7": [0.5, 2.5, 10.5]}
    assert by_block({"loss": 1.0}) == {}


def test_query_maps_are_rows_of_each_blocks_attention_and_are_saved(tmp_path):
    import numpy as np

    from trainer.diffusion import q_sample
    from trainer.locality import LOCALITY_NOISE_SEED, query_maps, query_tokens, save_query_maps
    from trainer.records import QUERIES_NPZ, QUERIES_PNG
    from trainer.model import modulate

    model = tiny_dit([3, None])
    schedule = linear_schedule(100)
    image = held_out(1)[0]
    maps = query_maps(model, schedule, image, 40)
    queries = query_tokens(model.grid)
    assert maps.shape == (2, 3, GRID, GRID) and queries[0] == (4, 4)
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), np.ones((2, 3)), rtol=1e-5)
    # Block 0's 3x3 window: nothing outside the query's neighbourhood.
    r, c = queries[1]
    outside = maps[0, 1].copy()
    outside[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = 0
    assert outside.max() == 0.0
    # Block 1 against its attention_probs written out here, on the block's own input (the first block's output).
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(LOCALITY_NOISE_SEED))
    t = torch.tensor([40])
    with torch.no_grad():
        x_t = q_sample(schedule, image[None], t, noise[None])
        h = model.patch_embed(x_t).flatten(2).transpose(1, 2) + model.pos_embed
        c_emb = model.t_embedder(t)
        h = model.blocks[0](h, c_emb, model._backend_for(h.device))
        block = model.blocks[1]
        shift, scale = block.adaLN_modulation(c_emb).chunk(6, dim=1)[:2]
        probs = block.attn.attention_probs(modulate(block.norm1(h), shift, scale))
    expected = probs[0].mean(dim=0)[queries[2][0] * GRID + queries[2][1]].reshape(GRID, GRID)
    np.testing.assert_allclose(maps[1, 2], expected.numpy(), rtol=1e-5, atol=1e-7)

    save_query_maps(tmp_path, maps, model.grid, 40)
    with np.load(tmp_path / QUERIES_NPZ) as saved:
        np.testing.assert_array_equal(saved["maps"], maps)
        assert saved["queries"].tolist() == [list(q) for q in queries] and int(saved["timestep"]) == 40
    assert (tmp_path / QUERIES_PNG).read_bytes()[:4] == b"\x89PNG"
