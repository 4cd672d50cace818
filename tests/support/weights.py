"""Stand-in FID Inception weights: the real file cannot be downloaded in tests."""

from __future__ import annotations

import torch

from trainer.inception import expected_state_dict_shapes


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
