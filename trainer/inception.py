"""The FID Inception-v3 network in plain torch, and loading its weights file's state dict into it.

Finding, downloading, caching and checking that file (a local path or an fsspec URI, its sha256 prefix)
is trainer.fid_weights' job; `load_fid_inception` asks it for a checked local copy, then loads it here.

FID is defined on the pool features of one specific network: TensorFlow's 2015-12-05 Inception-v3
graph, as used by the original FID code (TTUR). pytorch-fid converted that graph's weights into
torchvision's Inception3 layer names (`pt_inception-2015-12-05-6726825d.pth`). torchvision has no
build for our CPU torch, so the network is written out here; it loads that file unchanged.

TF's graph differs from torchvision's Inception3 in ways that change FID, and we follow TF:
  - 1008 output classes (the weights carry a 1008-way fc; FID itself never uses it);
  - the pool branch of Mixed_5b-d, Mixed_6b-e and Mixed_7b averages over the pixels inside the
    image only (TF's "SAME" average pool), i.e. count_include_pad=False;
  - the pool branch of the last block, Mixed_7c, is a 3x3 *max* pool.

The network is inference-only: batch norm uses the stored running statistics and nothing in it
trains, so its batch norm keeps no `num_batches_tracked` counter (one in a file is accepted and
ignored).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import FID_WEIGHTS_SHA256_PREFIX, FID_WEIGHTS_URL
from trainer.fid_weights import WeightsError, fetch_weights

INPUT_SIZE = 299  # Inception-v3 sees 299x299 images
FEATURE_DIM = 2048  # pool features after Mixed_7c: the space FID and KID are computed in
NUM_CLASSES = 1008  # TF's classifier: 1000 ImageNet classes plus 8 unused

_BN_EPS = 1e-3  # TF's batch norm epsilon in this graph


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
    """Batch norm at inference: (x - running_mean) / sqrt(running_var + eps) * weight + bias."""

    def __init__(self, channels: int, eps: float = _BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            training=False, momentum=0.0, eps=self.eps,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # A file saved from nn.BatchNorm2d carries a training step counter that inference never
        # reads; dropping it lets strict loading accept the weights file with or without it.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 0.001), ReLU: every convolution of Inception-v3."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = FrozenBatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_inside(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average over the pixels inside the image (TF's SAME pooling), shape kept."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)  # (B, 64, H, W)
        b5 = self.branch5x5_2(self.branch5x5_1(x))  # (B, 64, H, W)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (B, 96, H, W)
        bp = self.branch_pool(_avg_pool_inside(x))  # (B, pool_features, H, W)
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)  # (B, 384, H', W')
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (B, 96, H', W')
        bp = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, C_in, H', W')
        return torch.cat([b3, bd, bp], dim=1)


class FIDInceptionC(nn.Module):
    """17x17 block (Mixed_6b-e) with factorized 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)  # (B, 192, H, W)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))  # (B, 192, H, W)
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))  # (B, 192, H, W)
        bp = self.branch_pool(_avg_pool_inside(x))  # (B, 192, H, W)
        return torch.cat([b1, b7, bd, bp], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))  # (B, 320, H', W')
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(b7))  # (B, 192, H', W')
        bp = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, C_in, H', W')
        return torch.cat([b3, b7, bp], dim=1)


class FIDInceptionE(nn.Module):
    """8x8 block (Mixed_7b, Mixed_7c) with split 1x3 / 3x1 outputs.

    `pool` is "avg" for Mixed_7b and "max" for Mixed_7c: TF's graph max-pools in its last block.
    """

    def __init__(self, in_channels: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)  # (B, 320, H, W)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)  # (B, 768, H, W)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)  # (B, 768, ..)
        if self.pool == "avg":
            pooled = _avg_pool_inside(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)  # (B, 192, H, W)
        return torch.cat([b1, b3, bd, bp], dim=1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as TF's 2015-12-05 graph, returning the 2048-d pool features FID uses.

    Takes images in [0, 1], shape (B, 3, H, W), any H and W: they are resized to 299x299
    (bilinear, align_corners=False) and scaled to [-1, 1] inside `forward`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        # Part of the weights file (strict loading needs it); pool features do not use it.
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _to_network_input(images)  # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5b(x)  # (B, 256, 35, 35)
        x = self.Mixed_5c(x)  # (B, 288, 35, 35)
        x = self.Mixed_5d(x)  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6b(x)  # (B, 768, 17, 17)
        x = self.Mixed_6c(x)  # (B, 768, 17, 17)
        x = self.Mixed_6d(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(x)  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7b(x)  # (B, 2048, 8, 8)
        x = self.Mixed_7c(x)  # (B, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)


def _to_network_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, 299, 299) in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"FIDInceptionV3 expects RGB images of shape (B, 3, H, W), got {tuple(images.shape)}; "
            "repeat grayscale images to 3 channels (trainer.fid.extract_features does)"
        )
    x = images.float()
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


# ----------------------------------------------------------------------------------------------
# Loading the weights file (fetched and checked by trainer.fid_weights)
# ----------------------------------------------------------------------------------------------


def load_fid_inception(
    weights: str = FID_WEIGHTS_URL,
    cache_dir: str | os.PathLike | None = None,
    *,
    expected_sha256_prefix: str = FID_WEIGHTS_SHA256_PREFIX,
) -> FIDInceptionV3:
    """The FID Inception network with the weights in `weights`, on CPU, in eval mode.

    `weights` is a local path, used in place, or an fsspec URI (https://, s3://, file://,
    memory://, ...), downloaded once into `<cache_dir>/weights/` (default `default_cache_dir()`) by
    `trainer.fid_weights.fetch_weights`.
    The file's sha256 must start with `expected_sha256_prefix`; raises WeightsError otherwise, or
    when the file is missing or does not hold exactly the FID Inception state dict.
    """
    path = fetch_weights(weights, cache_dir, expected_sha256_prefix=expected_sha256_prefix)
    state_dict = _read_state_dict(path)
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"{path} does not hold the FID Inception-v3 weights: {err}") from err
    return model.eval()


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise WeightsError(f"{path} is not a readable torch weights file: {err}") from err
    if not isinstance(state_dict, Mapping):
        raise WeightsError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return state_dict

