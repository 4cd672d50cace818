"""DiT denoiser in pixel space with adaLN-Zero blocks (Peebles & Xie 2023) and per-block local attention.

The model predicts the noise epsilon (same shape as its input) and knows nothing about the noise
schedule: diffusion code calls it as `model(x_t, t, y)`. Each block's attention window comes from the
constructor's `windows` schedule (see `trainer.attention.block_windows`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from trainer.attention import (
    attend,
    check_window,
    flex_block_mask,
    is_global,
    resolve_backend,
    schedule_string,
    window_mask,
)
from trainer.footprint import dit_forward_flops
from trainer.schedule import MODEL_SIZES, parse_size  # noqa: F401 - re-exported


def build_dit(
    size: str,
    image_size: int,
    in_channels: int,
    windows: list[int | None],
    num_classes: int = 0,
    attention_backend: str = "auto",
    class_dropout: float = 0.1,
) -> DiT:
    """A DiT of a named size ("DiT-T/1", "DiT-XS/1", ...) with a per-block window schedule."""
    depth, width, heads, patch = parse_size(size)
    return DiT(
        image_size=image_size,
        in_channels=in_channels,
        depth=depth,
        width=width,
        heads=heads,
        windows=windows,
        patch_size=patch,
        num_classes=num_classes,
        class_dropout=class_dropout,
        attention_backend=attention_backend,
    )


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-image shift and scale of token features. x (B, N, D), shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_pos_embed(width: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (N, width): first half encodes the row, second the column."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.cat([_sincos_1d(width // 2, rows.flatten()), _sincos_1d(width // 2, cols.flatten())], dim=1)


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    # Frequencies 1 / 10000^(i / (dim/2)), as in the Transformer's position encoding.
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # (dim/2,)
    angles = positions.double()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # (N, dim)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (B, width) vectors: sinusoidal frequencies, then a two-layer MLP."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]  # (B, frequency_dim/2)
        features = torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (B, width); float64 models too (tests)


class LabelEmbedder(nn.Module):
    """Class labels -> (B, width). Row `num_classes` is the null class used for classifier-free guidance:
    in training a label is replaced by it with probability `dropout`, so the model also learns p(x)."""

    def __init__(self, num_classes: int, width: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)  # (B, width)


class SelfAttention(nn.Module):
    """Multi-head self-attention whose keys are restricted to a window around each query."""

    def __init__(self, width: int, heads: int, window: int | None, grid: tuple[int, int]):
        super().__init__()
        self.heads, self.window, self.grid = heads, window, grid
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = attend(q, k, v, self.window, self.grid, backend)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map this layer applies to tokens x (B, N, D): (B, heads, N, N), rows sum to 1.

        Written out in plain torch (the fast paths never materialize it), for analysis such as
        `trainer.locality`; masked keys get exactly zero weight.
        """
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, heads, head_dim)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)  # (B, heads, N, N)
        if not is_global(self.window, self.grid):
            allowed = window_mask(self.grid[0], self.grid[1], self.window).to(x.device)  # (N, N)
            scores = scores.masked_fill(~allowed, float("-inf"))
        return scores.float().softmax(dim=-1)  # (B, heads, N, N)


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning (adaLN-Zero).

    The gates start at zero, so every block starts as the identity: this is what makes DiT train
    stably without warm-up tricks.
    """

    def __init__(self, width: int, heads: int, window: int | None, grid: tuple[int, int], mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads, window, grid)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, backend: str) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a), backend)  # (B, N, D)
        x = x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map of each token to its patch of pixels."""

    def __init__(self, width: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, patch*patch*C)


class DiT(nn.Module):
    """Epsilon-predicting DiT on (B, C, H, W) images with one attention window per block."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        depth: int,
        width: int,
        heads: int,
        windows: list[int | None],
        patch_size: int = 1,
        num_classes: int = 0,
        class_dropout: float = 0.1,
        mlp_ratio: float = 4.0,
        attention_backend: str = "auto",
    ):
        super().__init__()
        _check_shapes(image_size, patch_size, depth, width, heads, windows)
        resolve_backend(attention_backend, "cpu")  # fail fast on an unknown name
        self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
        self.depth, self.width, self.heads, self.mlp_ratio = depth, width, heads, mlp_ratio
        self.num_classes = num_classes
        self.windows = [None if window is None else check_window(window) for window in windows]
        self.attention_backend = attention_backend
        self.grid = (image_size // patch_size, image_size // patch_size)
        # Requested backend -> the one that runs, per device type; filled on the first forward there,
        # because the device is only known once the model has been moved.
        self._backends: dict[str, str] = {}

        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed(width, self.grid)[None], persistent=False)  # (1, N, D)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width, class_dropout) if num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(width, heads, window, self.grid, mlp_ratio) for window in self.windows)
        self.final_layer = FinalLayer(width, patch_size, in_channels)
        self._init_weights()

    @property
    def schedule(self) -> str:
        """Per-block windows as a readable string, e.g. "3,5,7,9,11,13,G,G,G,G,G,G"."""
        return schedule_string(self.windows)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Treat the patch conv as the linear map it is (pixels of a patch -> width).
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.width, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        # adaLN-Zero: zero modulation makes each block the identity and the final output exactly 0.
        modulations = [block.adaLN_modulation[-1] for block in self.blocks] + [self.final_layer.adaLN_modulation[-1]]
        for layer in modulations + [self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) noisy images, t (B,) timesteps, y (B,) labels or None -> epsilon (B, C, H, W).

        For a class-conditional model, y=None means the null class (unconditional prediction).
        """
        backend = self._backend_for(x.device)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self._label_embedding(y, x.shape[0], x.device)  # (B, D)
        for block in self.blocks:
            h = block(h, c, backend)  # (B, N, D)
        h = self.final_layer(h, c)  # (B, N, patch*patch*C)
        return self.unpatchify(h)  # (B, C, H, W)

    def use_attention_backend(self, name: str) -> None:
        """Switch the requested attention backend (auto, dense, banded, flex) from the next forward on."""
        resolve_backend(name, "cpu")  # fail fast on an unknown name
        self.attention_backend = name
        self._backends.clear()

    def prepare_attention(self, device: torch.device) -> None:
        """Build what the attention backend keeps per window (FlexAttention's block masks) for `device`
        now, eagerly: `torch.compile` then reads them as constants instead of tracing their construction."""
        if self._backend_for(device) != "flex":
            return
        for block in self.blocks:
            if not is_global(block.attn.window, self.grid):
                flex_block_mask(self.grid, block.attn.window, device)

    def _backend_for(self, device: torch.device) -> str:
        if device.type not in self._backends:
            self._backends[device.type] = resolve_backend(self.attention_backend, device)
        return self._backends[device.type]

    def _label_embedding(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | float:
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("labels were given to an unconditional model (num_classes=0)")
            return 0.0
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return self.y_embedder(y)  # (B, D)

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, patch*patch*C) tokens -> (B, C, H, W) images."""
        B, p, C = h.shape[0], self.patch_size, self.in_channels
        gh, gw = self.grid
        h = h.reshape(B, gh, gw, p, p, C)  # (B, gh, gw, p, p, C)
        return h.permute(0, 5, 1, 3, 2, 4).reshape(B, C, gh * p, gw * p)  # (B, C, H, W)

    def flops_per_image(self) -> int:
        """Forward FLOPs for one image, matrix multiplies only (what counts: trainer.footprint.dit_forward_flops)."""
        return dit_forward_flops(self.grid, self.width, int(self.width * self.mlp_ratio),
                                 self.patch_size**2 * self.in_channels, self.t_embedder.frequency_dim, self.windows)


def _check_shapes(image_size: int, patch_size: int, depth: int, width: int, heads: int, windows: list) -> None:
    if patch_size < 1 or image_size % patch_size != 0:
        raise ValueError(
            f"patch size {patch_size} must divide image size {image_size}; "
            f"use a patch size among {[p for p in range(1, image_size + 1) if image_size % p == 0]}"
        )
    if len(windows) != depth:
        raise ValueError(f"got {len(windows)} attention windows for a {depth}-block model; give exactly {depth}")
    if width % heads != 0:
        raise ValueError(f"width {width} must be divisible by heads {heads}")
    if width % 4 != 0:  # the 2D sin-cos position embedding splits width into 4 equal parts
        raise ValueError(f"width {width} must be divisible by 4 for the 2D sin-cos position embedding")
