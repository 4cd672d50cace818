"""The FID Inception weights file's layout, written out from the architecture (not read off
trainer.inception's module, so a test can hold the two against each other), and stand-in weights in
that layout: the real file cannot be downloaded in tests."""

from __future__ import annotations

import torch

from trainer.inception import FEATURE_DIM, NUM_CLASSES

# (module path, in channels, out channels, kernel height, kernel width) of every convolution.
_CONVOLUTIONS: tuple[tuple[str, int, int, int, int], ...] = (
    # Stem: 299x299x3 -> 35x35x192 (max pools carry no weights).
    ("Conv2d_1a_3x3", 3, 32, 3, 3),
    ("Conv2d_2a_3x3", 32, 32, 3, 3),
    ("Conv2d_2b_3x3", 32, 64, 3, 3),
    ("Conv2d_3b_1x1", 64, 80, 1, 1),
    ("Conv2d_4a_3x3", 80, 192, 3, 3),
    # Mixed_5b: 192 -> 64 + 64 + 96 + 32 = 256.
    ("Mixed_5b.branch1x1", 192, 64, 1, 1),
    ("Mixed_5b.branch5x5_1", 192, 48, 1, 1),
    ("Mixed_5b.branch5x5_2", 48, 64, 5, 5),
    ("Mixed_5b.branch3x3dbl_1", 192, 64, 1, 1),
    ("Mixed_5b.branch3x3dbl_2", 64, 96, 3, 3),
    ("Mixed_5b.branch3x3dbl_3", 96, 96, 3, 3),
    ("Mixed_5b.branch_pool", 192, 32, 1, 1),
    # Mixed_5c: 256 -> 64 + 64 + 96 + 64 = 288.
    ("Mixed_5c.branch1x1", 256, 64, 1, 1),
    ("Mixed_5c.branch5x5_1", 256, 48, 1, 1),
    ("Mixed_5c.branch5x5_2", 48, 64, 5, 5),
    ("Mixed_5c.branch3x3dbl_1", 256, 64, 1, 1),
    ("Mixed_5c.branch3x3dbl_2", 64, 96, 3, 3),
    ("Mixed_5c.branch3x3dbl_3", 96, 96, 3, 3),
    ("Mixed_5c.branch_pool", 256, 64, 1, 1),
    # Mixed_5d: 288 -> 288.
    ("Mixed_5d.branch1x1", 288, 64, 1, 1),
    ("Mixed_5d.branch5x5_1", 288, 48, 1, 1),
    ("Mixed_5d.branch5x5_2", 48, 64, 5, 5),
    ("Mixed_5d.branch3x3dbl_1", 288, 64, 1, 1),
    ("Mixed_5d.branch3x3dbl_2", 64, 96, 3, 3),
    ("Mixed_5d.branch3x3dbl_3", 96, 96, 3, 3),
    ("Mixed_5d.branch_pool", 288, 64, 1, 1),
    # Mixed_6a (35 -> 17): 288 -> 384 + 96 + 288 (max pool) = 768.
    ("Mixed_6a.branch3x3", 288, 384, 3, 3),
    ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
    ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3),
    ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    # Mixed_6b: 768 -> 4 x 192 = 768, 7x7 branches 128 wide.
    ("Mixed_6b.branch1x1", 768, 192, 1, 1),
    ("Mixed_6b.branch7x7_1", 768, 128, 1, 1),
    ("Mixed_6b.branch7x7_2", 128, 128, 1, 7),
    ("Mixed_6b.branch7x7_3", 128, 192, 7, 1),
    ("Mixed_6b.branch7x7dbl_1", 768, 128, 1, 1),
    ("Mixed_6b.branch7x7dbl_2", 128, 128, 7, 1),
    ("Mixed_6b.branch7x7dbl_3", 128, 128, 1, 7),
    ("Mixed_6b.branch7x7dbl_4", 128, 128, 7, 1),
    ("Mixed_6b.branch7x7dbl_5", 128, 192, 1, 7),
    ("Mixed_6b.branch_pool", 768, 192, 1, 1),
    # Mixed_6c: 7x7 branches 160 wide.
    ("Mixed_6c.branch1x1", 768, 192, 1, 1),
    ("Mixed_6c.branch7x7_1", 768, 160, 1, 1),
    ("Mixed_6c.branch7x7_2", 160, 160, 1, 7),
    ("Mixed_6c.branch7x7_3", 160, 192, 7, 1),
    ("Mixed_6c.branch7x7dbl_1", 768, 160, 1, 1),
    ("Mixed_6c.branch7x7dbl_2", 160, 160, 7, 1),
    ("Mixed_6c.branch7x7dbl_3", 160, 160, 1, 7),
    ("Mixed_6c.branch7x7dbl_4", 160, 160, 7, 1),
    ("Mixed_6c.branch7x7dbl_5", 160, 192, 1, 7),
    ("Mixed_6c.branch_pool", 768, 192, 1, 1),
    # Mixed_6d: 7x7 branches 160 wide.
    ("Mixed_6d.branch1x1", 768, 192, 1, 1),
    ("Mixed_6d.branch7x7_1", 768, 160, 1, 1),
    ("Mixed_6d.branch7x7_2", 160, 160, 1, 7),
    ("Mixed_6d.branch7x7_3", 160, 192, 7, 1),
    ("Mixed_6d.branch7x7dbl_1", 768, 160, 1, 1),
    ("Mixed_6d.branch7x7dbl_2", 160, 160, 7, 1),
    ("Mixed_6d.branch7x7dbl_3", 160, 160, 1, 7),
    ("Mixed_6d.branch7x7dbl_4", 160, 160, 7, 1),
    ("Mixed_6d.branch7x7dbl_5", 160, 192, 1, 7),
    ("Mixed_6d.branch_pool", 768, 192, 1, 1),
    # Mixed_6e: 7x7 branches 192 wide.
    ("Mixed_6e.branch1x1", 768, 192, 1, 1),
    ("Mixed_6e.branch7x7_1", 768, 192, 1, 1),
    ("Mixed_6e.branch7x7_2", 192, 192, 1, 7),
    ("Mixed_6e.branch7x7_3", 192, 192, 7, 1),
    ("Mixed_6e.branch7x7dbl_1", 768, 192, 1, 1),
    ("Mixed_6e.branch7x7dbl_2", 192, 192, 7, 1),
    ("Mixed_6e.branch7x7dbl_3", 192, 192, 1, 7),
    ("Mixed_6e.branch7x7dbl_4", 192, 192, 7, 1),
    ("Mixed_6e.branch7x7dbl_5", 192, 192, 1, 7),
    ("Mixed_6e.branch_pool", 768, 192, 1, 1),
    # Mixed_7a (17 -> 8): 768 -> 320 + 192 + 768 (max pool) = 1280.
    ("Mixed_7a.branch3x3_1", 768, 192, 1, 1),
    ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
    ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1),
    ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
    ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1),
    ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    # Mixed_7b: 1280 -> 320 + 2 x 384 + 2 x 384 + 192 = 2048.
    ("Mixed_7b.branch1x1", 1280, 320, 1, 1),
    ("Mixed_7b.branch3x3_1", 1280, 384, 1, 1),
    ("Mixed_7b.branch3x3_2a", 384, 384, 1, 3),
    ("Mixed_7b.branch3x3_2b", 384, 384, 3, 1),
    ("Mixed_7b.branch3x3dbl_1", 1280, 448, 1, 1),
    ("Mixed_7b.branch3x3dbl_2", 448, 384, 3, 3),
    ("Mixed_7b.branch3x3dbl_3a", 384, 384, 1, 3),
    ("Mixed_7b.branch3x3dbl_3b", 384, 384, 3, 1),
    ("Mixed_7b.branch_pool", 1280, 192, 1, 1),
    # Mixed_7c: 2048 -> 2048.
    ("Mixed_7c.branch1x1", 2048, 320, 1, 1),
    ("Mixed_7c.branch3x3_1", 2048, 384, 1, 1),
    ("Mixed_7c.branch3x3_2a", 384, 384, 1, 3),
    ("Mixed_7c.branch3x3_2b", 384, 384, 3, 1),
    ("Mixed_7c.branch3x3dbl_1", 2048, 448, 1, 1),
    ("Mixed_7c.branch3x3dbl_2", 448, 384, 3, 3),
    ("Mixed_7c.branch3x3dbl_3a", 384, 384, 1, 3),
    ("Mixed_7c.branch3x3dbl_3b", 384, 384, 3, 1),
    ("Mixed_7c.branch_pool", 2048, 192, 1, 1),
)


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of `pt_inception-2015-12-05-6726825d.pth`, from the table above.

    Each convolution contributes `<path>.conv.weight` (out, in, kh, kw) and the four batch norm
    tensors `<path>.bn.{weight,bias,running_mean,running_var}` (out,); then the 1008-way `fc`.
    The file has no AuxLogits (FID's network has no auxiliary head). It was converted from TF and
    `num_batches_tracked` (a torch training counter) is not listed: loading drops it if present.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for path, in_channels, out_channels, kh, kw in _CONVOLUTIONS:
        shapes[f"{path}.conv.weight"] = (out_channels, in_channels, kh, kw)
        for tensor in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{path}.bn.{tensor}"] = (out_channels,)
    shapes["fc.weight"] = (NUM_CLASSES, FEATURE_DIM)
    shapes["fc.bias"] = (NUM_CLASSES,)
    return shapes


def random_fid_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the FID file's keys and shapes, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, shape in expected_state_dict_shapes().items():
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            value = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif key.endswith("running_var"):
            value = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("bn.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:  # bn.bias, bn.running_mean, fc.weight, fc.bias
            value = 0.1 * torch.randn(shape, generator=g)
        state_dict[key] = value
    return state_dict
