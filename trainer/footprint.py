"""A trial's footprint, from its config alone (nothing is decoded or allocated): the bytes it needs,
and a DiT's FLOPs per image (`dit_forward_flops`, which `DiT.flops_per_image` calls too).
`orchestrator.fit_check` compares the bytes with what a worker has.

The estimate is the peak of one `trainer.train` process, in bytes, as a sum of named terms:

- `data pool`: the uint8 copies of the training subset, the held-out images and the FID reference images
  gathered from the source, plus, unless the source is read memory-mapped (a prepared pack or a .npy,
  of which a trial reads only the shards or rows it gathers), the whole decoded source (count x C x S x S),
  held for the whole trial (PoolCache). Decoding an image folder or resizing an array briefly holds a
  second copy; that happens before the model exists.
- `model state`: fp32 parameters, their gradients, AdamW's two moments and the EMA copy (5 x 4 bytes a
  parameter), plus the position-embedding buffer of the model and of the EMA copy.
- `attention masks`: the masks the backend caches, one per distinct window (dense: an (N, N) bool;
  banded: the float (tiles, rows x W, band x W) tile mask).
- `activations`: what backward keeps per block, ACTIVATION_FACTOR x batch x tokens x width x 4 bytes
  (layer-norm inputs, modulated inputs, q/k/v, attention output, the MLP's two 4 x width tensors, ...;
  about 20 widths written out in DiTBlock.forward, rounded up for the copies reshapes make).
  On a GPU (`device="cuda"`, bf16 autocast in training) the bytes autocast really keeps, per token of
  one block (`gpu_block_bytes`, read from trainer/model.py's DiTBlock and trainer/attention.py):
    fp32, 4 bytes a value (the residual stream stays fp32, since x + a bf16 update promotes to fp32,
    and autocast runs LayerNorm in fp32): the block input x (saved by norm1), norm1's output (saved
    by the modulate product), x after the attention branch (saved by norm2), norm2's output: 4 widths.
    bf16, 2 bytes (every Linear's output, and the bf16 copy autocast makes of a Linear's fp32 input,
    which the Linear saves for its weight gradient): the modulated inputs of qkv and fc1, the attention
    output reshaped for proj (a copy: the transpose is not contiguous), proj's and fc2's outputs (saved
    by the gate products): 5 widths; fc1's output (saved by GELU) and GELU's output (saved by fc2):
    2 x the MLP's hidden width.
    Attention: FlexAttention and fused SDPA (global blocks) keep q, k, v and their output in bf16,
    4 x heads x the head dim the kernel runs at (`flex_head_dim`: 63 -> 64 for DiT-XS/1, as the padded
    copies are what is saved), and a fp32 logsumexp per head; no score matrix.
  Plus one more block's worth for the stem, the final layer and the loss, and the gradients backward
  holds while it walks a block. Dense and banded masks on a GPU keep the fp32 CPU rate and their
  scores (an upper bound; flex is the GPU default).
- `attention scores`: the softmax weights each local block keeps for backward, batch x heads x queries x
  keys x 4 bytes: the dense-mask backend keeps all N x N pairs; the banded backend each tile's band of
  keys; FlexAttention and global blocks (fused SDPA) keep none.
- `evaluation`: the largest no-grad batch (PSNR gap, sample grid or FID sampling, with the EMA model):
  EVAL_ACTIVATION_FACTOR widths per token live in one block at a time, plus one local block's scores;
  and the attention maps `trainer.locality` writes out for its images (heads x N x N each, in fp32 and
  float64); and, when `eval.jacobian` is on, its batched backward passes of `chunk` images (what backward
  keeps, as in training, at a batch of `chunk`) with the (d, d) Jacobian and its eigenvectors in fp32.

A UNet (`model.arch: unet`) has no attention terms; its activations are UNET_ACTIVATION_FACTOR x batch x
the elements of every feature map its ResBlocks write (`unet_feature_elements`), and its parameters are
counted from its layers (`unet_parameter_count`).

Training and evaluation never overlap (the graph is freed after each step), so the peak is
data pool + model state + masks + max(activations + attention scores, evaluation).
On a GPU the pool stays in host RAM (`host` in MemoryEstimate) and `total` is the GPU's peak:
`device data` (the uint8 subsets moved to the GPU) + model state (with autocast's cached bf16 copy of
the weights, 2 bytes a parameter) + masks + max(activations + attention scores, evaluation); evaluation
runs in fp32 without autocast, so its rate is the CPU's.
The factors are rounded up from reading the model; tests/test_footprint.py checks the total against the
peak resident memory of a real run, and (`gpu`-marked) against torch.cuda.max_memory_allocated. Allocator overhead and the Python/torch runtime (~0.3-0.5 GiB)
are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.config import TrialConfig
from trainer.schedule import attended_pairs, band_rows_per_tile, flex_head_dim, is_global, parse_size, parse_unet_size

FLOAT_BYTES = 4  # training and evaluation state is fp32 (autocast only on CUDA, and only for matmuls)
ACTIVATION_FACTOR = 24  # widths per token that backward keeps per block (see the module docstring)
EVAL_ACTIVATION_FACTOR = 12  # widths per token alive in one block of a no-grad forward
OPTIMIZER_COPIES = 5  # parameters, gradients, AdamW exp_avg and exp_avg_sq, EMA weights
TIMESTEP_FREQUENCIES = 256  # TimestepEmbedder's frequency_dim
MLP_RATIO = 4.0
# trainer.locality per attention-map entry: fp32 scores and probabilities, their float64 copy and the
# einsum's float64 product; plus its (N, N) float64 distance and neighbourhood maps.
LOCALITY_BYTES = 24
LOCALITY_MAPS = 4
GPU_EXTRA_BLOCKS = 1  # stem, final layer, loss and backward's gradients of one block (module docstring)
BF16_BYTES = 2  # what CUDA's autocast keeps Linear outputs and inputs in
AUTOCAST_WEIGHT_BYTES = 2  # autocast caches a bf16 copy of each weight for the step
UNET_ACTIVATION_FACTOR = 8  # per ResBlock output element: two norms, two SiLUs, two convs, the sum, the skip


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per term (see the module docstring) and the peak they add up to."""

    terms: dict[str, int]
    device: str = "cpu"  # where the trial's tensors live: "cpu" or "cuda"

    @property
    def total(self) -> int:
        """The peak of the memory the trial is limited by: RAM on "cpu", the GPU's memory on "cuda"."""
        t = self.terms
        data = t["device data"] if self.device == "cuda" else t["data pool"]
        resident = data + t["model state"] + t["attention masks"]
        return resident + max(t["activations"] + t["attention scores"], t["evaluation"])

    @property
    def host(self) -> int:
        """Host RAM: everything on "cpu"; the decoded pool (and the subsets gathered from it) on "cuda"."""
        return self.terms["data pool"] if self.device == "cuda" else self.total

    @property
    def biggest(self) -> str:
        """The largest term of `total` (on "cuda" the host-side pool is not one)."""
        counted = {k: v for k, v in self.terms.items() if not (self.device == "cuda" and k == "data pool")}
        return max(counted, key=counted.get)


def parameter_count(size: str, image_size: int, channels: int, num_classes: int = 0) -> int:
    """Parameters of `trainer.model.build_dit(size, image_size, channels, ...)`, counted from its layers."""
    depth, width, _, patch = parse_size(size)
    hidden = int(width * MLP_RATIO)
    pixels = patch * patch * channels

    def linear(inputs: int, outputs: int) -> int:
        return inputs * outputs + outputs

    count = linear(pixels, width)  # patch embedding (a conv of kernel = stride = patch)
    count += linear(TIMESTEP_FREQUENCIES, width) + linear(width, width)  # timestep MLP
    count += (num_classes + 1) * width if num_classes > 0 else 0  # label table with the null class
    block = linear(width, 3 * width) + linear(width, width)  # attention qkv, proj
    block += linear(width, hidden) + linear(hidden, width) + linear(width, 6 * width)  # MLP, adaLN
    count += depth * block
    count += linear(width, pixels) + linear(width, 2 * width)  # final layer, its adaLN
    return count


def dit_forward_flops(grid: tuple[int, int], width: int, hidden: int, pixels_per_patch: int, frequency_dim: int,
                      windows: list[int | None]) -> int:
    """Forward FLOPs of one image through a DiT (2 per multiply-add), counting matrix multiplies only:
    `trainer.model.DiT.flops_per_image` with the model's dimensions, `dit_flops_per_image` from a config.

    Linear layers and the patch conv count 2 * in * out per token (per image for the conditioning MLPs
    and adaLN, which act once per image). Attention counts Q K^T and P V as 2 * width FLOPs each per
    attended (query, key) pair, so a local window costs only the pairs its mask keeps. Norms, softmax
    and activations are left out (a few percent at these sizes). Training costs about 3x this.
    """
    tokens, D = grid[0] * grid[1], width
    flops = 2 * tokens * pixels_per_patch * D  # patch embedding
    flops += 2 * (frequency_dim * D + D * D)  # timestep MLP
    for window in windows:
        flops += 2 * D * 6 * D  # adaLN modulation
        flops += 2 * tokens * (D * 3 * D + D * D + 2 * D * hidden)  # qkv, out proj, MLP
        flops += 2 * 2 * D * attended_pairs(grid, window)  # Q K^T and P V over all heads
    flops += 2 * D * 2 * D + 2 * tokens * D * pixels_per_patch  # final adaLN and linear
    return flops


def dit_flops_per_image(config: TrialConfig, channels: int) -> int:
    """`dit_forward_flops` of the DiT a `config` builds for images of `channels` channels, without
    building it (and so without torch)."""
    _, width, _, patch = parse_size(config.model.size)
    side = config.data.image_size // patch
    return dit_forward_flops((side, side), width, int(width * MLP_RATIO), patch * patch * channels,
                             TIMESTEP_FREQUENCIES, config.windows)


def gpu_block_bytes(width: int, heads: int) -> int:
    """Bytes backward keeps per token of one DiTBlock under CUDA bf16 autocast with FlexAttention or fused
    SDPA (the accounting is in the module docstring)."""
    hidden = int(width * MLP_RATIO)
    fp32 = 4 * width * FLOAT_BYTES  # x, norm1(x), x after attention, norm2(x)
    bf16 = (5 * width + 2 * hidden) * BF16_BYTES  # qkv/fc1 inputs, proj input/output, fc2 output; fc1, GELU
    attention = 4 * heads * flex_head_dim(width // heads) * BF16_BYTES + heads * FLOAT_BYTES  # q, k, v, out; lse
    return fp32 + bf16 + attention


def attention_score_elements(grid: tuple[int, int], window: int | None, backend: str) -> int:
    """Query-key pairs one local block materializes per image and head under `backend` (resolved:
    dense, banded or flex); 0 for global attention and for FlexAttention."""
    tokens = grid[0] * grid[1]
    if window is None or is_global(window, grid) or backend == "flex":
        return 0
    rows = band_rows_per_tile(grid, window) if backend == "banded" else None
    if rows is None:  # dense masking (banded falls back to it when the band covers the grid)
        return tokens * tokens
    tiles, band = math.ceil(grid[0] / rows), rows + 2 * (window // 2)
    return tiles * (rows * grid[1]) * (band * grid[1])


def _mask_bytes(grid: tuple[int, int], windows: list[int | None], backend: str) -> int:
    total = 0
    for window in set(windows):
        elements = attention_score_elements(grid, window, backend)
        if elements == grid[0] * grid[1] * grid[0] * grid[1]:
            total += elements  # a bool (N, N) mask
        else:
            total += elements * FLOAT_BYTES  # the banded tile mask, in the activations' dtype
    return total


def resolved_backend(requested: str, device: str) -> str:
    """The backend a trial runs with on `device` ("cpu" or "cuda"), as trainer.attention.resolve_backend."""
    if requested == "auto":
        return "flex" if device == "cuda" else "banded"
    return requested


def estimate_trial_memory(config: TrialConfig, pool_images: int, channels: int, mapped: bool = False,
                          device: str = "cpu") -> MemoryEstimate:
    """Peak bytes of one trial of `config` whose data source holds `pool_images` images of `channels`
    channels, training on `device` ("cpu" or "cuda"). `mapped`: the source is read memory-mapped (a
    prepared pack or a .npy: `trainer.sources.source_shape`), so a trial holds only what it gathers."""
    if config.model.arch == "unet":
        return _unet_memory(config, pool_images, channels, mapped, device)
    data, train, ev = config.data, config.train, config.eval
    depth, width, heads, patch = parse_size(config.model.size)
    grid = (data.image_size // patch, data.image_size // patch)
    tokens = grid[0] * grid[1]
    backend = resolved_backend(config.attention.backend, device)
    windows = config.windows
    image_bytes = channels * data.image_size * data.image_size
    params = parameter_count(config.model.size, data.image_size, channels, config.model.num_classes)
    scores = [attention_score_elements(grid, w, backend) for w in windows]  # per image and head

    def forward_bytes(batch: int, factor: int) -> int:
        return batch * tokens * width * factor * FLOAT_BYTES

    if device == "cuda" and backend == "flex":  # bf16 autocast, no scores: see gpu_block_bytes
        activations = (depth + GPU_EXTRA_BLOCKS) * train.batch_size * tokens * gpu_block_bytes(width, heads)
    else:
        activations = depth * forward_bytes(train.batch_size, ACTIVATION_FACTOR)
    weight_copies = params * AUTOCAST_WEIGHT_BYTES if device == "cuda" else 0

    eval_batch = ev.psnr_gap.batch_size
    if ev.samples.grid > 0 or ev.fid.enabled:
        eval_batch = max(eval_batch, ev.fid.batch_size)  # sample grids and FID both sample in fid.batch_size
    evaluation = forward_bytes(eval_batch, EVAL_ACTIVATION_FACTOR) + eval_batch * heads * max(scores) * FLOAT_BYTES
    if ev.locality.enabled:  # trainer.locality writes out every block's full attention map, one block at a time
        evaluation = max(evaluation, (ev.locality.images * heads + LOCALITY_MAPS) * tokens * tokens * LOCALITY_BYTES)
    if ev.jacobian.enabled:
        chunk = min(ev.jacobian.chunk, image_bytes)
        jacobian = depth * forward_bytes(chunk, ACTIVATION_FACTOR) + chunk * heads * sum(scores) * FLOAT_BYTES
        evaluation = max(evaluation, jacobian + _jacobian_matrix_bytes(image_bytes))
    terms = {
        "data pool": _data_pool_bytes(config, pool_images, image_bytes, mapped),
        "device data": _subset_bytes(config, pool_images, image_bytes) if device == "cuda" else 0,
        "model state": OPTIMIZER_COPIES * params * FLOAT_BYTES + 2 * tokens * width * FLOAT_BYTES + weight_copies,
        "attention masks": _mask_bytes(grid, windows, backend),
        "activations": activations,
        "attention scores": train.batch_size * heads * sum(scores) * FLOAT_BYTES,
        "evaluation": evaluation,
    }
    return MemoryEstimate(terms, device)


def _data_pool_bytes(config: TrialConfig, pool_images: int, image_bytes: int, mapped: bool) -> int:
    """The decoded pool (none when it is read memory-mapped: a trial then holds only what it gathers),
    plus the training subset, the held-out images and the FID reference images gathered from it."""
    resident = 0 if mapped else pool_images * image_bytes
    return resident + _subset_bytes(config, pool_images, image_bytes) + _reference_bytes(config, pool_images, image_bytes)


def _reference_bytes(config: TrialConfig, pool_images: int, image_bytes: int) -> int:
    """The FID reference images, gathered from the pool when FID is on."""
    if not config.eval.fid.enabled:
        return 0
    pool_left = max(pool_images - min(config.data.test_images, pool_images), 0)
    return min(config.eval.fid.samples, pool_left) * image_bytes


def _subset_bytes(config: TrialConfig, pool_images: int, image_bytes: int) -> int:
    """The uint8 training subset and held-out images (on the trial's device)."""
    data = config.data
    held_out = min(data.test_images, pool_images)
    pool_left = max(pool_images - held_out, 0)
    train_images = min(data.num_images or pool_left, pool_left)
    if data.fraction is not None:
        train_images = max(1, round(data.fraction * pool_left))
    return (train_images + held_out) * image_bytes


def _jacobian_matrix_bytes(d: int) -> int:
    """The (d, d) Jacobian, its symmetric part and eigenvectors, in fp32."""
    return 3 * d * d * FLOAT_BYTES


def unet_feature_elements(size: str, image_size: int) -> int:
    """Elements per image of the feature maps the UNet's ResBlocks write (trainer.unet's layout)."""
    channels, multipliers = parse_unet_size(size)
    widths = [channels * m for m in multipliers]
    sides = [image_size // 2**i for i in range(len(widths))]
    down = sum(w * s * s for w, s in zip(widths, sides))
    middle = widths[-1] * sides[-1] ** 2
    return channels * image_size**2 + 2 * down + middle  # stem, down and up paths (same widths), middle


def unet_parameter_count(size: str, channels: int) -> int:
    """Parameters of `trainer.unet.build_unet(size, ..., channels)`, counted from its layers (no torch)."""
    base, multipliers = parse_unet_size(size)
    embed = 4 * base

    def conv(inputs: int, outputs: int, kernel: int = 3) -> int:
        return inputs * outputs * kernel * kernel + outputs

    def resblock(inputs: int, outputs: int) -> int:
        skip = conv(inputs, outputs, 1) if inputs != outputs else 0
        norms = 2 * inputs + 2 * outputs  # GroupNorm weight and bias
        return norms + conv(inputs, outputs) + (embed * outputs + outputs) + conv(outputs, outputs) + skip

    widths = [base * m for m in multipliers]
    count = (TIMESTEP_FREQUENCIES * embed + embed) + (embed * embed + embed) + conv(channels, base)
    previous = base
    for i, width in enumerate(widths):
        count += resblock(previous, width) + (conv(width, width) if i < len(widths) - 1 else 0)
        previous = width
    count += resblock(previous, previous)
    for width in reversed(widths):
        count += resblock(previous + width, width)
        previous = width
    return count + 2 * previous + conv(previous, channels)


def _unet_memory(config: TrialConfig, pool_images: int, channels: int, mapped: bool, device: str) -> MemoryEstimate:
    """fp32 rates on every device (an upper bound under CUDA's bf16 autocast)."""
    data, train, ev = config.data, config.train, config.eval
    image_bytes = channels * data.image_size * data.image_size
    params = unet_parameter_count(config.model.size, channels)
    features = unet_feature_elements(config.model.size, data.image_size) * UNET_ACTIVATION_FACTOR * FLOAT_BYTES
    eval_batch = ev.psnr_gap.batch_size
    if ev.samples.grid > 0 or ev.fid.enabled:
        eval_batch = max(eval_batch, ev.fid.batch_size)
    evaluation = eval_batch * features // 2  # no-grad: a few maps alive at a time
    if ev.jacobian.enabled:
        evaluation = max(evaluation, min(ev.jacobian.chunk, image_bytes) * features + _jacobian_matrix_bytes(image_bytes))
    terms = {
        "data pool": _data_pool_bytes(config, pool_images, image_bytes, mapped),
        "device data": _subset_bytes(config, pool_images, image_bytes) if device == "cuda" else 0,
        "model state": OPTIMIZER_COPIES * params * FLOAT_BYTES,
        "attention masks": 0,
        "activations": train.batch_size * features,
        "attention scores": 0,
        "evaluation": evaluation,
    }
    return MemoryEstimate(terms, device)


def format_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'; binary units, as memory is sold and reported by the kernel."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(count) < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PiB"
