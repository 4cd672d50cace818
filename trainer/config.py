"""The trial configuration: one pydantic model per concern, every key documented where it is declared.

A trial is fully described by a `TrialConfig`. Sweeps build one per grid point from a partial `base`
plus axis values, so everything here has a default and `extra="forbid"` catches typos early. Files are
read by `trainer.bounded_yaml`; the messages of a refused config are bounded by `trainer.messages`.
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from trainer.bounded_yaml import load_yaml, safe_load_bounded, yaml_problem
from trainer.messages import ConfigError, format_validation_error, short_repr
from trainer.schedule import UNET_SIZES, block_windows, check_unet_image_size, parse_size, schedule_string

# The FID weights (trainer/fid_weights.py fetches and checks them, trainer/inception.py loads them):
# Inception-v3 as pytorch-fid ships it.
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# The file name carries the first 8 hex digits of the file's sha256 (torch.hub's convention).
FID_WEIGHTS_SHA256_PREFIX = "6726825d"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `true` as 1: `steps: true` would train one step and
        # `windows: [true]` would silently be a 1x1 window.
        items = value if isinstance(value, list) else [value]
        numeric = _takes_numbers(cls.model_fields[info.field_name].annotation)
        if numeric and any(isinstance(item, bool) for item in items):
            raise ValueError(f"expects numbers, not booleans (got {short_repr(value)})")
        return value


def _takes_numbers(annotation: Any) -> bool:
    """True for int, float and anything built from them (int | None, list[int | None]); not for bool."""
    if annotation in (int, float):
        return True
    return any(_takes_numbers(arg) for arg in typing.get_args(annotation))


DEFAULT_SIZES = {"dit": "DiT-T/1", "unet": "UNet-T"}


class ModelConfig(_Section):
    arch: Literal["dit", "unet"] = Field(
        "dit",
        description="`dit` (the DiT with per-block attention windows) or `unet` (a small convolutional UNet, "
        "the baseline of Kadkhodaie et al. 2024; unconditional, no attention: `attention.placement` must "
        "be `none`, its default for a UNet, and the locality metrics are skipped)",
    )
    size: str = Field(
        "DiT-T/1",
        description="named size; for `dit` with a patch suffix: `DiT-T` (12 blocks, width 64, 2 heads; ours, for "
        "CPUs), `DiT-XS` (12, 252, 4), `DiT-S` (12, 384, 6), `DiT-B` (12, 768, 12); `/1` = patch size 1; "
        "for `unet`: `UNet-T` (32 channels, levels x1, x2, x2; the default for a UNet), `UNet-S` (64; x1, x2, "
        "x2, x4)",
    )
    num_classes: int = Field(
        0, ge=0,
        description="class-conditional when > 0 (labels from the data); 0 = unconditional",
    )
    class_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="label drop probability (classifier-free guidance)")

    @model_validator(mode="before")
    @classmethod
    def _size_of_the_arch(cls, data: Any) -> Any:
        """A size left out is the arch's default size."""
        if isinstance(data, dict) and "size" not in data and data.get("arch") in DEFAULT_SIZES:
            return {**data, "size": DEFAULT_SIZES[data["arch"]]}
        return data


class AttentionConfig(_Section):
    placement: Literal["none", "head", "mix", "tail", "custom"] = Field(
        "head",
        description="`none` (all global), `head` (windows on the first blocks), `tail` (on the last blocks), `mix` "
        "(local and global interleaved), `custom` (one entry per block)",
    )
    windows: list[int | None] = Field(
        [3, 5, 7, 9, 11, 13],
        description="odd window sizes in tokens; a query sees the k x k tokens centred on it, clipped at the "
        "border; for `custom` one entry per block with `null` = global",
    )
    backend: Literal["auto", "dense", "banded", "flex"] = Field(
        "auto",
        description="`dense` (masked SDPA, the reference), `banded` (row tiles against the key rows their windows "
        "reach; fast on CPU), `flex` (block-sparse FlexAttention, CUDA); `auto` picks flex on CUDA, "
        "banded elsewhere",
    )


class DataConfig(_Section):
    source: str = Field(
        "digits",
        description="builtin name (`digits`: 8x8 handwritten digits; `natural`, `natural-gray`: non-overlapping "
        "16x16 or 32x32 patches of two photographs, RGB or grayscale, training and held-out ones from interleaved "
        "stripes 16 pixels apart: 1040 training + 520 held-out at 16 (N up to 1024), 260 + 130 at 32 (N up to "
        "256); none downloaded), an image folder, a `.npy`/`.npz` uint8 array "
        "(N, H, W, C), a folder of Parquet files with an image column, an LMDB export (LSUN), a pack made by "
        "`prepare-data` (read memory-mapped: a trial reads only the shards of its images); local path or `s3://` URI "
        "(cached locally)",
    )
    image_size: int = Field(8, ge=2, description="images are center-cropped and resized to this square size")
    num_images: int | None = Field(
        None, ge=1,
        description="training subset size N (give this or `data.fraction`; neither = the whole pool)",
    )
    fraction: float | None = Field(
        None, gt=0.0, le=1.0,
        description="training subset as a share of the pool, in (0, 1]",
    )
    test_images: int = Field(256, ge=1, description="held-out images, the same for every subset and shuffle")
    shuffle_seed: int = Field(0, ge=0, description="chooses which images form the training subset")
    disjoint: bool = Field(
        False,
        description="subsets of different `data.shuffle_seed` share no image: the pool is cut (fixed order) into "
        "shards of the subset size and seed s trains on shard s; for the reproducibility score of two "
        "models trained on disjoint data",
    )

    @model_validator(mode="after")
    def _one_size(self) -> "DataConfig":
        if self.num_images is not None and self.fraction is not None:
            raise ValueError(
                f"give data.num_images ({self.num_images}) or data.fraction ({self.fraction}), not both"
            )
        return self


class DiffusionConfig(_Section):
    timesteps: int = Field(1000, ge=2, description="DDPM steps (linear betas)")
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0, description="first beta")
    beta_end: float = Field(0.02, gt=0.0, lt=1.0, description="last beta")


class TrainConfig(_Section):
    steps: int = Field(600, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1, description="images per step")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate (constant after warmup)")
    warmup_steps: int = Field(50, ge=0, description="linear warmup")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    ema: float = Field(0.995, ge=0.0, lt=1.0, description="EMA decay of the weights used for evaluation")
    grad_clip: float = Field(1.0, gt=0.0, description="max global gradient norm")
    log_every: int = Field(10, ge=1, description="steps between loss reports")
    compile: bool = Field(
        False,
        description="`torch.compile` the model on CUDA (ignored on CPU, where it does not pay)",
    )


class PsnrGapConfig(_Section):
    images: int = Field(
        128,
        ge=1,
        description="Held-out images scored: always the first this many of the held-out split, the same set "
        "for every trial, N and shuffle. The train side scores the first min(N, this) training images.",
    )
    timesteps: int = Field(10, ge=1, description="Diffusion steps spread over the schedule.")
    batch_size: int = Field(256, ge=1, description="Evaluation batch size.")
    clip: bool = Field(
        False,
        description="Clip the one-step x0 estimate to [-1, 1] before PSNR. false = score the raw estimate, "
        "as Kadkhodaie et al. 2024 do; true = score the clipped one, which raises PSNR on both sides at high "
        "noise (where the raw estimate overshoots the data range). Compare only curves of one setting.",
    )


class FidConfig(_Section):
    enabled: bool = Field(False, description="compute FID and KID at each evaluation")
    samples: int = Field(1000, ge=2, description="generated (and reference) images")
    steps: int = Field(50, ge=1, description="DDIM steps per sample")
    batch_size: int = Field(250, ge=1, description="sampling and feature batch size")
    weights: str = Field(
        FID_WEIGHTS_URL,
        description="URI or path of `pt_inception-2015-12-05-6726825d.pth` (sha256 checked, cached); `launch` "
        "checks it can be had before any trial starts",
    )
    weights_sha256: str = Field(
        FID_WEIGHTS_SHA256_PREFIX, pattern=r"^[0-9a-f]{8,64}$",
        description="expected sha256 prefix of the weights file; change it only for other Inception weights (FIDs "
        "are comparable only under the same weights)",
    )


class SamplesConfig(_Section):
    grid: int = Field(
        8, ge=0,
        description="side of the sample grid (`samples.png`, `samples.npy`: grid² DDIM samples of the EMA model "
        "from fixed noise) saved at each evaluation and attached to the trial's run; 0 = none",
    )
    steps: int = Field(50, ge=1, description="DDIM steps per grid sample")


class LocalityConfig(_Section):
    enabled: bool = Field(
        True,
        description="log per-block attention locality: `attn_distance.block_N` (attention-weighted mean query-key "
        "distance in tokens), `attn_local3.block_N`, `attn_local7.block_N` (share of attention inside "
        "the 3x3 / 7x7 neighbourhood); blocks numbered from 0; plot `attn_locality.png`",
    )
    images: int = Field(8, ge=1, description="held-out images the attention maps are computed on")
    timesteps: list[int] = Field(
        [100, 500, 900], min_length=1,
        description="diffusion steps the held-out images are noised to",
    )


class JacobianConfig(_Section):
    enabled: bool = Field(
        False,
        description="at the end of training, the Jacobian of the EMA model's one-step denoiser at noisy held-out "
        "images (trainer.jacobian; Kadkhodaie et al. 2024): `jac_asymmetry.t<t>`, `jac_trace.t<t>`, `jac_pr.t<t>` "
        "(participation ratio) per timestep, the mean eigenvalue spectrum as metric series "
        "`jacobian_spectrum.t<t>` (step = rank), the top eigenvectors as `jacobian_eigenvectors.png` and "
        "`jacobian.npz` (the report's eigenspace alignment of disjoint-subset trials)",
    )
    images: int = Field(2, ge=1, description="held-out images (the first ones, fixed) the Jacobian is taken at")
    timesteps: list[int] = Field(
        [100, 400, 700], min_length=1,
        description="diffusion steps the held-out images are noised to (fixed noise)",
    )
    top_k: int = Field(8, ge=1, description="eigenvectors kept (largest eigenvalues first) for the pictures and alignment")
    chunk: int = Field(
        256, ge=1,
        description="basis vectors per batched vector-Jacobian product: bounds memory (one backward pass of "
        "`chunk` images at a time); d = channels x height x width products in all",
    )


class EvalConfig(_Section):
    every: int = Field(0, ge=0, description="steps between evaluations and checkpoints; 0 = only at the end")
    psnr_gap: PsnrGapConfig = PsnrGapConfig()
    fid: FidConfig = FidConfig()
    samples: SamplesConfig = SamplesConfig()
    locality: LocalityConfig = LocalityConfig()
    jacobian: JacobianConfig = JacobianConfig()


class TrialConfig(_Section):
    """Everything that decides a trial's result. Two equal configs train the same model."""

    model: ModelConfig = ModelConfig()
    attention: AttentionConfig = AttentionConfig()
    data: DataConfig = DataConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    seed: int = Field(0, ge=0, description="seeds initialization, batches and training noise")

    @model_validator(mode="before")
    @classmethod
    def _no_attention_default_for_a_unet(cls, data: Any) -> Any:
        """A UNet has no attention: attention.placement left out is `none` (given, it must be `none`)."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        attention = data.get("attention", {})
        if data["model"].get("arch") == "unet" and isinstance(attention, dict) and "placement" not in attention:
            return {**data, "attention": {**attention, "placement": "none"}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "TrialConfig":
        if self.model.arch == "unet":
            self._check_unet()
        else:
            self._check_dit()
        if self.diffusion.beta_end <= self.diffusion.beta_start:
            raise ValueError("diffusion.beta_end must be larger than diffusion.beta_start")
        for name, timesteps in (("locality", self.eval.locality.timesteps), ("jacobian", self.eval.jacobian.timesteps)):
            outside = [t for t in timesteps if not 0 <= t < self.diffusion.timesteps]
            if outside:
                raise ValueError(
                    f"eval.{name}.timesteps={list(timesteps)}: {outside} outside the schedule's steps "
                    f"0..{self.diffusion.timesteps - 1} (diffusion.timesteps={self.diffusion.timesteps})"
                )
        if self.eval.fid.steps > self.diffusion.timesteps or self.eval.samples.steps > self.diffusion.timesteps:
            raise ValueError(
                f"eval.fid.steps={self.eval.fid.steps} and eval.samples.steps={self.eval.samples.steps} must not "
                f"exceed diffusion.timesteps={self.diffusion.timesteps}"
            )
        return self

    def _check_unet(self) -> None:
        if self.model.size not in UNET_SIZES:
            raise ValueError(f"model.size={short_repr(self.model.size)} is not a UNet size; with model.arch=unet "
                             f"choose one of {', '.join(UNET_SIZES)}")
        check_unet_image_size(self.model.size, self.data.image_size)
        if self.model.num_classes:
            raise ValueError(f"model.arch=unet is unconditional; set model.num_classes=0 (got {self.model.num_classes})")
        if self.attention.placement != "none":
            raise ValueError(
                f"model.arch=unet has no attention, so attention windows cannot apply: attention.placement must be "
                f"'none' (got {self.attention.placement!r}); leave it out or sweep windows on DiTs only"
            )

    def _check_dit(self) -> None:
        try:
            depth, _, _, patch = parse_size(self.model.size)
        except ValueError as err:
            raise ValueError(f"model.size: {err}") from None
        if self.data.image_size % patch:
            raise ValueError(
                f"data.image_size={self.data.image_size} is not divisible by the patch size {patch} "
                f"of model.size={short_repr(self.model.size)}"
            )
        try:
            block_windows(depth, self.attention.placement, list(self.attention.windows))
        except ValueError as err:
            raise ValueError(f"attention.windows={list(self.attention.windows)}: {err}") from None

    @property
    def windows(self) -> list[int | None]:
        """The per-block window schedule (None = global attention); empty for a UNet (no attention)."""
        if self.model.arch == "unet":
            return []
        depth = parse_size(self.model.size)[0]
        return block_windows(depth, self.attention.placement, list(self.attention.windows))

    @property
    def schedule(self) -> str:
        return schedule_string(self.windows)


# ---------------------------------------------------------------------------------------------
# Building configs from YAML and `--set` overrides


def parse_override(item: str) -> tuple[str, Any]:
    """`train.steps=50` -> ("train.steps", 50); the value is parsed as a YAML scalar or list."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects dotted.key=value, got {short_repr(item)}")
    try:
        value = safe_load_bounded(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {short_repr(item)}: value is not valid YAML ({yaml_problem(err)})") from None
    return key.strip(), value


def set_dotted(tree: dict, key: str, value: Any, *, schema: type[BaseModel] | None = TrialConfig) -> None:
    """Set `a.b.c` in a nested dict, refusing paths that the schema does not have."""
    parts = key.split(".")
    model = schema
    node = tree
    for i, part in enumerate(parts):
        if model is not None:
            field = model.model_fields.get(part)
            if field is None:
                prefix = ".".join(parts[:i])
                choices = ", ".join(sorted(model.model_fields))
                where = f" under '{prefix}'" if prefix else ""
                raise ConfigError(f"unknown config key {short_repr(key)}: no {short_repr(part)}{where} (choices: {choices})")
            annotation = field.annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
            if model is None and i < len(parts) - 1:
                raise ConfigError(f"unknown config key {short_repr(key)}: '{'.'.join(parts[: i + 1])}' is not a section")
        if i == len(parts) - 1:
            node[part] = value
        else:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is a value, not a section")
            node = child


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(tree)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(out, key, value)
    return out


def build_config(tree: dict, *, prefix: str = "") -> TrialConfig:
    """Validate a nested dict into a TrialConfig, raising ConfigError with a readable message."""
    try:
        return TrialConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, prefix)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> TrialConfig:
    return build_config(apply_overrides(load_yaml(path), list(overrides)))


def flatten(config: TrialConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values, e.g. {"attention.windows": [3, 5], "train.steps": 600}."""
    tree = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat
