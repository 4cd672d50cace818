"""Window masks, per-block placements and attention backends, checked against plain references."""

import math

import pytest
import torch

from trainer.attention import (
    attend,
    band_rows_per_tile,
    banded_attention,
    block_windows,
    flex_head_dim,
    resolve_backend,
    schedule_string,
    window_mask,
)

PAPER_WINDOWS = [3, 5, 7, 9, 11, 13]


def brute_force_mask(height, width, window):
    tokens = [(r, c) for r in range(height) for c in range(width)]
    radius = window // 2
    return torch.tensor(
        [[abs(r - r2) <= radius and abs(c - c2) <= radius for (r2, c2) in tokens] for (r, c) in tokens]
    )


# ---- window_mask -------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width, window", [(4, 4, 3), (5, 3, 3), (3, 6, 5), (6, 4, 1), (7, 5, 7), (2, 9, 9)])
def test_window_mask_matches_brute_force(height, width, window):
    mask = window_mask(height, width, window)
    assert mask.dtype == torch.bool
    assert mask.shape == (height * width, height * width)
    assert torch.equal(mask, brute_force_mask(height, width, window))


@pytest.mark.parametrize("window", [1, 3, 5])
def test_window_mask_symmetric_with_true_diagonal(window):
    mask = window_mask(8, 6, window)
    assert torch.equal(mask, mask.T)
    assert mask.diagonal().all()


@pytest.mark.parametrize("window", [3, 5, 7])
def test_corner_sees_clipped_window_and_interior_sees_full_window(window):
    side = 16
    mask = window_mask(side, side, window)
    corners = [0, side - 1, side * (side - 1), side * side - 1]
    for corner in corners:
        assert mask[corner].sum() == ((window + 1) // 2) ** 2
    centre = (side // 2) * side + side // 2
    assert mask[centre].sum() == window * window


def test_window_one_is_identity():
    assert torch.equal(window_mask(5, 7, 1), torch.eye(35, dtype=torch.bool))


@pytest.mark.parametrize("height, width", [(8, 8), (4, 6)])
def test_window_spanning_grid_is_all_true(height, width):
    window = 2 * max(height, width) - 1
    assert window_mask(height, width, window).all()
    assert not window_mask(height, width, window - 2).all()


@pytest.mark.parametrize("window", [4, 0, -3, 2.0, "3", True, None])
def test_window_mask_rejects_bad_window(window):
    with pytest.raises(ValueError, match=f"odd integer >= 1, got {window!r}"):
        window_mask(4, 4, window)


# ---- block_windows ------------------------------------------------------------------------------

G = None


@pytest.mark.parametrize(
    "placement, expected",
    [
        ("none", [G] * 12),
        ("head", [3, 5, 7, 9, 11, 13, G, G, G, G, G, G]),
        ("tail", [G, G, G, G, G, G, 3, 5, 7, 9, 11, 13]),
        ("mix", [3, G, 5, G, 7, G, 9, G, 11, G, 13, G]),
    ],
)
def test_block_windows_paper_placements(placement, expected):
    assert block_windows(12, placement, PAPER_WINDOWS) == expected


def test_block_windows_custom_and_short_lists():
    custom = [3, 3, 3, 5, 5, 5, 7, 7, 7, G, G, G]  # the paper's "Local*"
    assert block_windows(12, "custom", custom) == custom
    assert block_windows(4, "head", [3]) == [3, G, G, G]
    assert block_windows(4, "tail", [3, 5]) == [G, G, 3, 5]
    assert block_windows(5, "mix", [3, 5, 7]) == [3, G, 5, G, 7]
    assert block_windows(3, "head", []) == [G, G, G]
    assert block_windows(2, "none", [4, 6]) == [G, G]  # windows ignored, not validated


@pytest.mark.parametrize(
    "depth, placement, windows, message",
    [
        (12, "side", [3], r"unknown attention placement 'side'; choose one of none, head, tail, mix, custom"),
        (6, "head", [3] * 7, r"placement 'head' puts 7 windows on a 6-block model; use at most 6"),
        (6, "tail", [3] * 7, r"placement 'tail' puts 7 windows on a 6-block model; use at most 6"),
        (12, "mix", [3] * 7, r"placement 'mix' puts 7 windows on a 12-block model; use at most 6"),
        (12, "head", [3, 4], r"odd integer >= 1, got 4"),
        (12, "head", [0], r"odd integer >= 1, got 0"),
        (12, "tail", [3.0], r"odd integer >= 1, got 3.0"),
        (12, "custom", [3, None], r"got 2 entries for a 12-block model"),
        (2, "custom", [3, 6], r"odd integer >= 1, got 6"),
        (0, "head", [3], r"depth must be an integer >= 1, got 0"),
    ],
)
def test_block_windows_errors_name_the_value(depth, placement, windows, message):
    with pytest.raises(ValueError, match=message):
        block_windows(depth, placement, windows)


def test_schedule_string():
    assert schedule_string(block_windows(12, "head", PAPER_WINDOWS)) == "3,5,7,9,11,13,G,G,G,G,G,G"
    assert schedule_string([G, 3]) == "G,3"


# ---- backends -----------------------------------------------------------------------------------


def naive_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) with -inf outside the mask) v, written out."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def random_qkv(grid, batch=2, heads=2, head_dim=16, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, grid[0] * grid[1], head_dim)
    return [torch.randn(shape, generator=generator).to(device).requires_grad_() for _ in range(3)]


def grads(output, inputs, seed=1):
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed)).to(output.device)
    return torch.autograd.grad(output, inputs, upstream)


@pytest.mark.parametrize("grid, window", [((8, 8), 3), ((8, 8), 5), ((6, 4), 3), ((5, 7), 1)])
def test_dense_matches_naive_forward_and_gradients(grid, window):
    q, k, v = random_qkv(grid)
    expected = naive_attention(q, k, v, window_mask(*grid, window))
    actual = attend(q, k, v, window, grid, "dense")
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    for got, want in zip(grads(actual, (q, k, v)), grads(expected, (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_window_covering_grid_equals_global_attention():
    grid = (8, 6)
    q, k, v = random_qkv(grid)
    full_window = 2 * max(grid) - 1
    global_out = attend(q, k, v, None, grid, "dense")
    torch.testing.assert_close(attend(q, k, v, full_window, grid, "dense"), global_out)
    # The same through an explicit all-True mask, so the shortcut is not what makes them equal.
    torch.testing.assert_close(naive_attention(q, k, v, window_mask(*grid, full_window)), global_out, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("grid, window, head_dim", [((8, 8), 3, 16), ((6, 4), 5, 16), ((8, 8), 5, 21)])
def test_flex_matches_dense_forward_on_cpu(grid, window, head_dim):
    # FlexAttention has no backward on CPU (torch raises NotImplementedError), so forward only here;
    # gradients are compared on CUDA in tests/test_gpu.py. Head dim 21 takes the zero-padded path
    # (padded to 32, scale kept at 1/sqrt(21)), as DiT-XS/1's 63 does.
    q, k, v = (t.detach() for t in random_qkv(grid, head_dim=head_dim))
    dense = attend(q, k, v, window, grid, "dense")
    try:
        flex = attend(q, k, v, window, grid, "flex")
    except NotImplementedError as error:  # older torch in our range (2.5) has no CPU flex forward
        pytest.skip(f"FlexAttention forward is not implemented on CPU in torch {torch.__version__}: {error}")
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


def test_flex_head_dim_rounds_up_to_a_power_of_two():
    assert [flex_head_dim(d) for d in (1, 16, 17, 32, 63, 64, 65, 72)] == [16, 16, 32, 32, 64, 64, 128, 128]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["flex", "banded"])
@pytest.mark.parametrize("grid, window", [((32, 32), 3), ((32, 32), 13), ((16, 8), 5)])
def test_fast_backends_match_dense_on_cuda(grid, window, backend):
    q, k, v = random_qkv(grid, head_dim=32, device="cuda")
    dense = attend(q, k, v, window, grid, "dense")
    fast = attend(q, k, v, window, grid, backend)
    torch.testing.assert_close(fast, dense, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads(fast, (q, k, v)), grads(dense, (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# Tile heights that divide the grid, that leave a padded last tile, one-row tiles, and bands that
# overhang both borders (window 9 on 5 rows).
@pytest.mark.parametrize(
    "grid, window, rows",
    [((8, 8), 3, 2), ((8, 8), 5, 4), ((7, 5), 5, 3), ((6, 4), 3, 4), ((9, 9), 5, 1), ((5, 5), 9, 2), ((3, 9), 5, 2)],
)
def test_banded_matches_naive_forward_and_gradients(grid, window, rows):
    q, k, v = random_qkv(grid)
    expected = naive_attention(q, k, v, window_mask(*grid, window))
    actual = banded_attention(q, k, v, window, grid, rows)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    for got, want in zip(grads(actual, (q, k, v)), grads(expected, (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_banded_gradcheck_in_double():
    q, k, v = (t.detach().double().requires_grad_() for t in random_qkv((5, 4), batch=1, heads=1, head_dim=3))
    assert torch.autograd.gradcheck(lambda q, k, v: banded_attention(q, k, v, 3, (5, 4), 2), (q, k, v))


@pytest.mark.parametrize("grid, window", [((32, 32), 3), ((32, 32), 13), ((64, 64), 7), ((16, 16), 3)])
def test_banded_backend_through_attend_matches_dense(grid, window):
    assert band_rows_per_tile(grid, window) is not None  # these sizes do take the banded path
    q, k, v = random_qkv(grid, batch=1, heads=2, head_dim=8)
    dense = attend(q, k, v, window, grid, "dense")
    banded = attend(q, k, v, window, grid, "banded")
    torch.testing.assert_close(banded, dense, atol=1e-5, rtol=0)
    for got, want in zip(grads(banded, (q, k, v)), grads(dense, (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_band_rows_per_tile_falls_back_to_dense_when_bands_cover_the_grid():
    assert band_rows_per_tile((8, 8), 3) is None  # 64 tokens: global attention is already cheap
    assert band_rows_per_tile((16, 16), 13) is None  # the band spans almost every row
    rows = band_rows_per_tile((32, 32), 3)
    assert rows is not None and 1 <= rows < 32
    q, k, v = random_qkv((8, 8))
    torch.testing.assert_close(attend(q, k, v, 5, (8, 8), "banded"), attend(q, k, v, 5, (8, 8), "dense"))


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == "banded"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_backend("dense", "cuda") == "dense"
    assert resolve_backend("banded", "cuda") == "banded"
    assert resolve_backend("flex", "cpu") == "flex"
    with pytest.raises(
        ValueError, match=r"unknown attention backend 'natten'; choose one of auto, dense, banded, flex"
    ):
        resolve_backend("natten", "cpu")


def test_attend_rejects_unresolved_backend():
    q, k, v = random_qkv((4, 4))
    with pytest.raises(ValueError, match="resolved backend.*'auto'"):
        attend(q, k, v, 3, (4, 4), "auto")


@pytest.mark.parametrize("batch", [1, 3])
def test_banded_takes_q_k_v_as_the_model_slices_them_from_one_projection(batch):
    """In the model q, k and v are slices of one (B, N, 3, heads, head_dim) projection, permuted: not
    contiguous. A batch of one (trainer.locality's attention maps) once made the key bands' `view` fail."""
    grid, heads, head_dim, window = (16, 16), 2, 8, 3
    assert band_rows_per_tile(grid, window) is not None  # the banded path is taken
    qkv = torch.randn(batch, grid[0] * grid[1], 3, heads, head_dim, generator=torch.Generator().manual_seed(0))
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim), strided views
    assert not k.is_contiguous()
    banded = attend(q, k, v, window, grid, "banded")
    dense = naive_attention(q.contiguous(), k.contiguous(), v.contiguous(), window_mask(*grid, window))
    torch.testing.assert_close(banded, dense, atol=1e-5, rtol=0)
