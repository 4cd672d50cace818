"""The denoiser a trial trains, by `model.arch`: the DiT with its window schedule, or the UNet baseline."""

from __future__ import annotations

from trainer.config import TrialConfig
from trainer.model import DiT, build_dit
from trainer.unet import UNet, build_unet


def build_model(config: TrialConfig, in_channels: int) -> DiT | UNet:
    if config.model.arch == "unet":
        return build_unet(config.model.size, image_size=config.data.image_size, in_channels=in_channels)
    return build_dit(
        config.model.size,
        image_size=config.data.image_size,
        in_channels=in_channels,
        windows=config.windows,
        num_classes=config.model.num_classes,
        attention_backend=config.attention.backend,
        class_dropout=config.model.class_dropout,
    )
