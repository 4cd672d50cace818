"""The CUDA-only paths: FlexAttention's block-sparse kernels against a float64 reference, and the
trainer's bf16 autocast training with `torch.compile` and FlexAttention. Skipped without a GPU.

The reference is the masked softmax written out in float64 from the same (rounded) inputs, so each
backend's error is measured, not one backend against another. fp32 must agree to fp32 rounding;
bf16 kernels round their inputs and partial sums to 8 mantissa bits, so the bound there is relative:
FlexAttention's error may be at most twice that of the dense-mask SDPA kernel torch itself ships.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.attention import attend, window_mask
from trainer.config import TrialConfig
from trainer.pool import Subsets
from trainer.train import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HEADS = 4  # DiT-XS/1 and DiT-S/1 differ in head count too; 4 heads keep the reference small

# Windows 3..13 on the 32x32 grid of the paper (bf16: the training precision), both head dims of the
# paper's models (DiT-XS/1: 252/4 = 63, padded for the kernel; DiT-S/1: 384/6 = 64). fp32 (the
# evaluation precision) and the 64x64 grid at the narrowest, a middle and the widest window.
CASES = (
    [(torch.bfloat16, 32, window, head_dim) for head_dim in (63, 64) for window in (3, 5, 7, 9, 11, 13)]
    + [(torch.float32, 32, window, head_dim) for head_dim in (63, 64) for window in (3, 7, 13)]
    + [(dtype, 64, window, head_dim) for dtype in (torch.bfloat16, torch.float32) for head_dim in (63, 64)
       for window in (3, 13)]
)


def reference_attention(q, k, v, window, grid):
    """softmax(q k^T / sqrt(d), -inf outside the window) v, in the inputs' dtype (float64 here)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~window_mask(*grid, window).to(q.device), float("-inf"))
    return scores.softmax(dim=-1) @ v


def forward_and_grads(fn, inputs, upstream):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return [out.detach(), *torch.autograd.grad(out, inputs, upstream.to(out.dtype))]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize(
    "dtype, side, window, head_dim", CASES,
    ids=[f"{str(d).removeprefix('torch.')}-{s}x{s}-w{w}-hd{h}" for d, s, w, h in CASES],
)
def test_flex_matches_the_float64_reference_forward_and_gradients(dtype, side, window, head_dim):
    grid = (side, side)
    generator = torch.Generator(device="cuda").manual_seed(window * 100 + head_dim)
    shape = (2, HEADS, side * side, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", generator=generator).to(dtype) for _ in range(3))
    upstream = torch.randn(shape, device="cuda", generator=generator)

    exact = [t.double() for t in (q, k, v)]  # the rounded inputs, held exactly: gradients in float64 too
    want = forward_and_grads(lambda *t: reference_attention(*t, window, grid), exact, upstream.double())
    flex = forward_and_grads(lambda *t: attend(*t, window, grid, "flex"), (q, k, v), upstream)
    assert all(t.dtype == dtype and torch.isfinite(t).all() for t in flex)
    names = ("output", "dq", "dk", "dv")
    if dtype == torch.float32:
        for name, got, ref in zip(names, flex, want):
            torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        return
    dense = forward_and_grads(lambda *t: attend(*t, window, grid, "dense"), (q, k, v), upstream)
    for name, got, baseline, ref in zip(names, flex, dense, want):
        flex_error, dense_error = relative_error(got, ref), relative_error(baseline, ref)
        assert flex_error <= 2 * dense_error + 1e-3, f"{name}: flex {flex_error:.2e} vs dense SDPA {dense_error:.2e}"
        assert flex_error < 2e-2, f"{name}: relative error {flex_error:.2e} is beyond bf16 rounding"


def _tiny_trainer(compile: bool) -> Trainer:
    """DiT-T/1 on a 32x32 grid with the paper's head windows: every local block runs FlexAttention."""
    config = TrialConfig.model_validate({
        "model": {"size": "DiT-T/1"},
        "attention": {"placement": "head", "windows": [3, 5, 7, 9, 11, 13], "backend": "auto"},
        "data": {"image_size": 32},
        "train": {"batch_size": 16, "compile": compile, "warmup_steps": 0},
        "eval": {"psnr_gap": {"images": 16, "timesteps": 3, "batch_size": 16}},
    })
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return Trainer(config, torch.device("cuda"), Subsets(train=images[:32].cuda(), test=images[32:].cuda()))


def test_bf16_compiled_training_and_fp32_evaluation_stay_compiled(monkeypatch):
    """Training (bf16 autocast, grad) and evaluation (fp32, no grad) through six windows each need
    their own compiled flex kernel: none may fall back to eager FlexAttention for want of budget."""
    import torch._dynamo

    for flag in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(torch._dynamo.config, flag):
            monkeypatch.setattr(torch._dynamo.config, flag, True)
            break
    else:
        pytest.skip(f"torch {torch.__version__} cannot be told to fail at the recompile limit")
    trainer = _tiny_trainer(compile=True)
    assert trainer.model.schedule.startswith("3,5,7,9,11,13,G")
    losses = [trainer.train_step() for _ in range(4)]
    assert all(math.isfinite(loss) for loss in losses), losses
    curve = trainer.evaluate()
    assert all(math.isfinite(value) for value in curve.gap), curve


def test_bf16_training_matches_fp32_training_to_bf16_precision():
    """The same seeded step in bf16 autocast and in fp32 gives losses that agree to bf16 rounding:
    autocast changes the arithmetic, not the model."""
    bf16 = _tiny_trainer(compile=False)
    fp32 = _tiny_trainer(compile=False)
    fp32.autocast = lambda: torch.autocast("cuda", enabled=False)
    for _ in range(2):
        a, b = bf16.train_step(), fp32.train_step()
        assert abs(a - b) <= 0.02 * abs(b) + 1e-3, (a, b)
