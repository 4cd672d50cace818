"""A small convolutional UNet denoiser: the baseline whose Jacobian shows geometry-adaptive harmonic bases.

Kadkhodaie et al. 2024 (ICLR) find GAHB in UNet denoisers that generalize; the DiT paper contrasts them
with DiTs. This UNet is of their kind, sized for CPUs: a few resolution levels of residual conv blocks
(GroupNorm, SiLU, 3x3 convs) with a sinusoidal timestep embedding added in every block, stride-2 conv
downsampling, nearest upsampling, and skip connections concatenated on the way up. It predicts epsilon
with the DiT's calling convention, `model(x_t, t, y=None)`, so the trainer, the diffusion code and the
evaluations use it unchanged. It is unconditional (`model.num_classes` must be 0) and has no attention:
`trainer.config` refuses attention windows for it and the locality metrics are skipped.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.model import TimestepEmbedder
from trainer.schedule import check_unet_image_size, parse_unet_size

GROUPS = 8  # GroupNorm groups (fewer when a layer has fewer channels)


def build_unet(size: str, image_size: int, in_channels: int) -> "UNet":
    channels, multipliers = parse_unet_size(size)
    check_unet_image_size(size, image_size)
    return UNet(image_size=image_size, in_channels=in_channels, channels=channels, multipliers=multipliers)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(GROUPS, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added between, and a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed = nn.Linear(embed_dim, out_channels)
        self.norm2, self.conv2 = _norm(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = h + self.embed(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))  # (B, out, H, W)
        return self.skip(x) + h


class UNet(nn.Module):
    """Epsilon-predicting UNet on (B, C, H, W) images: one ResBlock per level down and up, one in the middle."""

    def __init__(self, image_size: int, in_channels: int, channels: int, multipliers: tuple[int, ...]):
        super().__init__()
        self.image_size, self.in_channels = image_size, in_channels
        embed_dim = 4 * channels
        self.t_embedder = TimestepEmbedder(embed_dim)
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        widths = [channels * m for m in multipliers]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        previous = channels
        for i, width in enumerate(widths):
            self.down.append(ResBlock(previous, width, embed_dim))
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
            previous = width
        self.middle = ResBlock(previous, previous, embed_dim)
        self.up = nn.ModuleList()
        for width in reversed(widths):  # input: the path so far concatenated with the skip of this level
            self.up.append(ResBlock(previous + width, width, embed_dim))
            previous = width
        self.out_norm = _norm(previous)
        self.out = nn.Conv2d(previous, in_channels, 3, padding=1)
        # The output starts at zero, as the DiT's adaLN-Zero final layer: the first loss is E[eps^2] = 1.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) noisy images, t (B,) timesteps -> epsilon (B, C, H, W). Unconditional: y must be None."""
        if y is not None:
            raise ValueError("labels were given to the UNet, which is unconditional (model.num_classes=0)")
        emb = self.t_embedder(t).to(x.dtype)  # (B, 4 * channels)
        h = self.stem(x)  # (B, channels, H, W)
        skips = []
        for block, downsample in zip(self.down, self.downsample):
            h = block(h, emb)
            skips.append(h)
            h = downsample(h)  # halves H and W except at the last level
        h = self.middle(h, emb)
        for i, block in enumerate(self.up):
            skip = skips.pop()
            if h.shape[-1] != skip.shape[-1]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))  # (B, C, H, W)

    def flops_per_image(self) -> int:
        """Forward FLOPs for one image (2 per multiply-add) of the convolutions and linear layers, counted
        by running one image through the model with hooks (norms and activations are left out)."""
        total = 0

        def count(module: nn.Module, inputs, output) -> None:
            nonlocal total
            if isinstance(module, nn.Conv2d):
                per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                total += 2 * per_output * output.numel()
            else:
                total += 2 * module.in_features * module.out_features

        handles = [m.register_forward_hook(count) for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            with torch.no_grad():
                self(torch.zeros(1, self.in_channels, self.image_size, self.image_size), torch.zeros(1, dtype=torch.long))
        finally:
            for handle in handles:
                handle.remove()
        return total
