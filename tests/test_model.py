"""The DiT denoiser on tiny configs: 2 blocks, width 32, 2 heads, 8x8 images."""

import pytest
import torch

from trainer.model import DiT, MODEL_SIZES, build_dit, parse_size
from trainer.schedule import attended_pairs
from trainer.attention import window_mask


def tiny_dit(windows=(3, None), patch_size=1, num_classes=0, **kwargs):
    torch.manual_seed(0)
    return DiT(
        image_size=8,
        in_channels=3,
        depth=len(windows),
        width=32,
        heads=2,
        windows=list(windows),
        patch_size=patch_size,
        num_classes=num_classes,
        **kwargs,
    )


def perturb_(model, std=0.1):
    """Randomise every parameter so adaLN-Zero's zero gates no longer hide anything."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * std)
    return model


def inputs(batch=4, num_classes=0):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.randint(0, num_classes, (batch,), generator=generator) if num_classes else None
    return x, t, y


@pytest.mark.parametrize("patch_size", [1, 2])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_shape_equals_input_and_starts_at_zero(patch_size, num_classes):
    model = tiny_dit(patch_size=patch_size, num_classes=num_classes)
    x, t, y = inputs(num_classes=num_classes)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))  # adaLN-Zero: the untrained model predicts 0


def test_float_timesteps_and_null_class():
    model = perturb_(tiny_dit(num_classes=10)).eval()
    x, t, y = inputs(num_classes=10)
    assert model(x, t.float() + 0.5, y).shape == x.shape
    null = torch.full_like(y, 10)
    torch.testing.assert_close(model(x, t), model(x, t, null))  # y=None means the null class


def test_labels_to_unconditional_model_raise():
    model = tiny_dit()
    x, t, _ = inputs()
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, torch.zeros(4, dtype=torch.long))


def test_unpatchify_inverts_patch_layout():
    model = tiny_dit(patch_size=2)
    images = torch.randn(2, 3, 8, 8)
    # (B, C, gh, p, gw, p) -> (B, gh*gw, p*p*C), the token layout the final layer produces
    tokens = images.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 12)
    assert torch.equal(model.unpatchify(tokens), images)


def test_schedule_string():
    assert tiny_dit(windows=(3, 5, None, None)).schedule == "3,5,G,G"
    model = build_dit("DiT-T/1", 8, 3, [3, 5, 7, 9, 11, 13] + [None] * 6)
    assert model.schedule == "3,5,7,9,11,13,G,G,G,G,G,G"


def test_full_grid_window_equals_global_model_with_same_weights():
    global_model = perturb_(tiny_dit(windows=(None, None))).eval()
    full_window = perturb_(tiny_dit(windows=(15, 15))).eval()  # 2 * 8 - 1 covers the 8x8 grid
    full_window.load_state_dict(global_model.state_dict())
    local = perturb_(tiny_dit(windows=(3, 3))).eval()
    local.load_state_dict(global_model.state_dict())
    x, t, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(full_window(x, t), global_model(x, t))
        assert not torch.allclose(local(x, t), global_model(x, t), atol=1e-3)  # the window does act


def test_flops_local_below_global():
    local, global_model = tiny_dit(windows=(3, 3)), tiny_dit(windows=(None, None))
    assert 0 < local.flops_per_image() < global_model.flops_per_image()
    # The saving is exactly the dropped attention pairs: 2 blocks x (QK^T + PV) x 2 FLOPs x width.
    dropped = 64 * 64 - attended_pairs((8, 8), 3)
    assert global_model.flops_per_image() - local.flops_per_image() == 2 * 2 * 2 * 32 * dropped


@pytest.mark.parametrize("grid, window", [((8, 8), 3), ((5, 7), 5), ((4, 4), 1), ((4, 4), None)])
def test_attended_pairs_counts_the_mask(grid, window):
    expected = grid[0] * grid[1] * grid[0] * grid[1] if window is None else int(window_mask(*grid, window).sum())
    assert attended_pairs(grid, window) == expected


def test_gradients_reach_every_parameter():
    model = perturb_(tiny_dit(windows=(3, None), num_classes=10, class_dropout=0.0))
    x, t, y = inputs(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = (model(x, t, y) - x).square().mean()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    optimizer.step()
    assert torch.isfinite(model(x, t, y)).all()


def test_parse_size_and_registry():
    assert parse_size("DiT-XS/1") == (12, 252, 4, 1)
    assert parse_size("DiT-T/2") == (12, 64, 2, 2)
    assert parse_size("DiT-S") == (*MODEL_SIZES["DiT-S"], 1)


@pytest.mark.parametrize("name", ["DiT-L/2", "dit-xs/1", "DiT-XS/0", "DiT-XS/", "DiT-XS/1/2", ""])
def test_parse_size_rejects_unknown_names(name):
    with pytest.raises(ValueError, match=rf"unknown model size '{name}'.*DiT-T/<patch>, DiT-XS/<patch>"):
        parse_size(name)


def test_build_dit_validates():
    with pytest.raises(ValueError, match="patch size 3 must divide image size 8"):
        DiT(image_size=8, in_channels=3, depth=1, width=32, heads=2, windows=[None], patch_size=3)
    with pytest.raises(ValueError, match="got 6 attention windows for a 12-block model"):
        build_dit("DiT-T/1", 8, 3, [3] * 6)
    with pytest.raises(ValueError, match="odd integer >= 1, got 4"):
        build_dit("DiT-T/1", 8, 3, [4] + [None] * 11)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        build_dit("DiT-T/1", 8, 3, [None] * 12, attention_backend="fast")


def test_build_dit_passes_class_dropout():
    model = build_dit("DiT-T/2", 8, 3, [None] * 12, num_classes=10, class_dropout=0.25)
    assert model.y_embedder.dropout == 0.25
    assert model.grid == (4, 4)


def test_banded_and_dense_backends_train_the_same_model():
    """On a grid where `banded` takes its fast path (16x16, window 3), the model's output and every
    parameter gradient match the dense-mask reference."""

    def model_with(backend):
        torch.manual_seed(0)
        model = DiT(image_size=16, in_channels=3, depth=2, width=32, heads=2, windows=[3, None],
                    attention_backend=backend)
        return perturb_(model)

    generator = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 3, 16, 16, generator=generator), torch.randint(0, 1000, (2,), generator=generator)
    outputs, grads = {}, {}
    for backend in ("banded", "dense"):
        model = model_with(backend)
        outputs[backend] = model(x, t)
        outputs[backend].square().mean().backward()
        grads[backend] = {name: p.grad for name, p in model.named_parameters()}
    torch.testing.assert_close(outputs["banded"], outputs["dense"], atol=1e-5, rtol=0)
    for name, grad in grads["dense"].items():
        torch.testing.assert_close(grads["banded"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_use_attention_backend_switches_and_validates():
    model = tiny_dit()
    model.use_attention_backend("dense")
    assert model.attention_backend == "dense"
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        model.use_attention_backend("fast")


def test_compiled_flex_model_reads_prepared_block_masks_and_matches_dense(recwarn):
    """`torch.compile` of a model on FlexAttention must not trace the block masks' construction (dynamo
    warned, on CUDA, that it traced straight through the lru_cache that held them, rebuilding every mask
    in every forward): `prepare_attention` builds them first and the graph reads them as constants.
    Traced here by dynamo with a backend that keeps the graph and runs it eagerly (forward only:
    FlexAttention has no CPU backward). Same outputs as dense attention, and a smaller graph than
    when the masks are left to be built during tracing."""
    import torch._dynamo

    from trainer import attention

    flex = tiny_dit(windows=(3, 5, None))
    perturb_(flex)
    dense = tiny_dit(windows=(3, 5, None), attention_backend="dense")
    dense.load_state_dict(flex.state_dict())
    flex.use_attention_backend("flex")
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([10, 500])
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    with torch.no_grad():
        expected = dense(x, t)
        for prepared in (False, True):
            attention._FLEX_MASKS.clear()
            if prepared:
                flex.prepare_attention(torch.device("cpu"))
            torch._dynamo.reset()
            out = torch.compile(flex, backend=keep_graph, fullgraph=True)(x, t)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    unprepared_nodes, prepared_nodes = graphs
    assert prepared_nodes < unprepared_nodes, graphs  # the masks' construction is out of the graph
    traced_through = [str(w.message) for w in recwarn if "lru_cache" in str(w.message)]
    assert not traced_through, traced_through
