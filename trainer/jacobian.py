"""The Jacobian of the one-step denoiser and its eigenbasis: geometry-adaptive harmonic bases (GAHB).

Kadkhodaie et al. 2024 ("Generalization in diffusion models arises from geometry-adaptive harmonic
representations", ICLR 2024) look at the denoiser f(x_t) = x0_hat, the one-step clean-image estimate
x0_hat = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t) (`trainer.diffusion.predict_x0`, the
estimate the PSNR gap scores), through its Jacobian J = df/dx_t at a noisy image. A denoiser that
generalizes acts locally like an adaptive shrinkage in an orthonormal basis: J is nearly symmetric, its
eigenvectors are oscillating patterns that follow the image's contours (the GAHB), and its eigenvalues
(shrinkage factors, in [0, 1] for an ideal shrinker) decay smoothly. Per image and noise level we report:

- `asymmetry` = ||J - J^T||_F / ||J||_F (0 for a symmetric Jacobian, as that of an MMSE denoiser,
  which is the gradient of a scalar function: Miyasawa / Tweedie);
- the eigen-decomposition of the symmetric part (J + J^T) / 2 (torch.linalg.eigh), eigenvalues in
  descending order and the top-k eigenvectors;
- the effective dimensionality two ways: the trace, sum_i lambda_i (the denoiser's degrees of freedom,
  Kadkhodaie et al.'s measure of the dimension of the subspace it preserves), and the participation
  ratio PR = (sum_i lambda_i)^2 / sum_i lambda_i^2 (the usual definition; = m for m equal eigenvalues
  and 0 elsewhere);
- across two models (e.g. trained on disjoint subsets, `data.disjoint`): the alignment of their top-k
  eigenspaces, the mean squared cosine of the principal angles ||U1^T U2||_F^2 / k (1 = the same
  subspace; about k / d for unrelated random subspaces of dimension k in R^d).

J is computed with torch.func: one forward pass, then vector-Jacobian products with the standard basis
vectors, vmapped over chunks of `chunk` basis vectors (row i of J is e_i^T J), so memory is bounded by
the chunk and no Python loop runs over pixels. Callers evaluate in fp32 with autocast off
(`trainer.train.fp32_evaluation`); the functions here keep the dtype they are given (tests use float64).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from trainer.diffusion import Schedule, predict_x0, q_sample
from trainer.storage import write_atomically
from trainer.records import JACOBIAN_NPZ, JACOBIAN_PNG, JACOBIAN_PREFIX
from trainer.tiles import tiles_png

# Noise for the analysis is fixed, as for the PSNR gap: trials differ only by their model.
JACOBIAN_NOISE_SEED = 20240505


def one_step_denoiser(model: Callable, schedule: Schedule, t: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x_t (C, H, W) -> x0_hat (C, H, W) at timestep t: `predict_x0` of the model's epsilon (unconditional)."""

    def denoise(x: torch.Tensor) -> torch.Tensor:
        t_batch = torch.full((1,), t, device=x.device, dtype=torch.long)
        batch = x[None]  # (1, C, H, W)
        return predict_x0(schedule, batch, t_batch, model(batch, t_batch, None))[0]

    return denoise


def jacobian(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The Jacobian of f at x as a (f(x).numel(), x.numel()) matrix, J[i, j] = d f(x)_i / d x_j.

    One forward pass (torch.func.vjp), then the VJP function vmapped over `chunk` standard basis
    vectors at a time: each batch of cotangents e_i gives rows i of J."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    with torch.enable_grad(), warnings.catch_warnings():
        # CPU SDPA's backward has no vmap batching rule: torch loops over the batch itself and says so per call.
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        out, vjp = torch.func.vjp(f, x)
        batched_vjp = torch.func.vmap(vjp)
        rows = []
        for start in range(0, out.numel(), chunk):
            count = min(chunk, out.numel() - start)
            basis = torch.zeros(count, out.numel(), dtype=out.dtype, device=out.device)
            basis[torch.arange(count), torch.arange(start, start + count)] = 1.0
            (grads,) = batched_vjp(basis.view(count, *out.shape))  # (count, *x.shape)
            rows.append(grads.reshape(count, x.numel()).detach())
    return torch.cat(rows)


@dataclass(frozen=True)
class Eigenbasis:
    """The analysis of one Jacobian J (d, d): its asymmetry and the eigen-decomposition of (J + J^T) / 2."""

    asymmetry: float
    eigenvalues: torch.Tensor  # (d,) descending
    eigenvectors: torch.Tensor  # (d, d); column i belongs to eigenvalues[i]

    @property
    def trace(self) -> float:
        return float(self.eigenvalues.sum())

    @property
    def participation_ratio(self) -> float:
        return participation_ratio(self.eigenvalues)

    def top(self, k: int) -> torch.Tensor:
        """The top-k eigenvectors as orthonormal columns (d, k)."""
        return self.eigenvectors[:, :k]


def asymmetry(matrix: torch.Tensor) -> float:
    """||J - J^T||_F / ||J||_F (0 for a zero matrix)."""
    norm = torch.linalg.matrix_norm(matrix)
    return float(torch.linalg.matrix_norm(matrix - matrix.T) / norm) if norm > 0 else 0.0


def participation_ratio(eigenvalues: torch.Tensor) -> float:
    """(sum lambda)^2 / sum lambda^2; 0 when all eigenvalues are 0."""
    squares = eigenvalues.pow(2).sum()
    return float(eigenvalues.sum().pow(2) / squares) if squares > 0 else 0.0


def eigenbasis(matrix: torch.Tensor) -> Eigenbasis:
    """Asymmetry of a square Jacobian and the eigen-decomposition of its symmetric part, largest first."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"a Jacobian eigenbasis needs a square matrix, got shape {tuple(matrix.shape)}")
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)  # ascending
    return Eigenbasis(asymmetry(matrix), values.flip(0), vectors.flip(1))


def alignment(basis_a: torch.Tensor, basis_b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the spans of two (d, k) orthonormal bases:
    ||U_a^T U_b||_F^2 / k (1 = the same subspace, about k / d for unrelated random subspaces)."""
    if basis_a.shape != basis_b.shape or basis_a.ndim != 2:
        raise ValueError(f"alignment needs two (d, k) bases of one shape, got {tuple(basis_a.shape)} and "
                         f"{tuple(basis_b.shape)}")
    return float((basis_a.T @ basis_b).pow(2).sum() / basis_a.shape[1])


# ---------------------------------------------------------------------------------------------
# The trainer's analysis: a few held-out images at a few noise levels


@dataclass(frozen=True)
class JacobianAnalysis:
    """Per timestep t and image n: asymmetry (T, n), eigenvalues (T, n, d) descending, top-k eigenvectors
    (T, n, k, C, H, W); with the clean images (n, C, H, W) and their noisy versions and one-step estimates
    (T, n, C, H, W), all in model scale [-1, 1]."""

    timesteps: list[int]
    asymmetry: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    images: np.ndarray
    noisy: np.ndarray
    denoised: np.ndarray

    def metrics(self) -> dict[str, float]:
        """jac_asymmetry.t<t>, jac_trace.t<t>, jac_pr.t<t>: means over the images."""
        out = {}
        for i, t in enumerate(self.timesteps):
            values = torch.from_numpy(self.eigenvalues[i])
            out[f"{JACOBIAN_PREFIX}asymmetry.t{t}"] = float(self.asymmetry[i].mean())
            out[f"{JACOBIAN_PREFIX}trace.t{t}"] = float(values.sum(dim=1).mean())
            out[f"{JACOBIAN_PREFIX}pr.t{t}"] = float(np.mean([participation_ratio(v) for v in values]))
        return out

    def spectrum_record(self) -> str:
        """The mean eigenvalue at each rank per timestep, as compact JSON (`parse_spectrum_record`)."""
        return json.dumps({"timestep": self.timesteps, "eigenvalues": self.eigenvalues.mean(axis=1).tolist()})

    def npz(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, timesteps=np.asarray(self.timesteps), asymmetry=self.asymmetry, eigenvalues=self.eigenvalues,
                 eigenvectors=self.eigenvectors, images=self.images, noisy=self.noisy, denoised=self.denoised)
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, payload: bytes) -> "JacobianAnalysis":
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            fields = {name: data[name] for name in ("asymmetry", "eigenvalues", "eigenvectors", "images", "noisy",
                                                     "denoised")}
            return cls(timesteps=[int(t) for t in data["timesteps"]], **fields)

    def save(self, directory: Path) -> None:
        """Write JACOBIAN_NPZ and JACOBIAN_PNG into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(directory / JACOBIAN_NPZ, self.npz())
        write_atomically(directory / JACOBIAN_PNG, eigenvector_png(self))


def jacobian_analysis(
    model: Callable, schedule: Schedule, images: torch.Tensor, timesteps: list[int], top_k: int, chunk: int = 256
) -> JacobianAnalysis:
    """Jacobians of the one-step denoiser of `model` (unconditional) at `images` (n, C, H, W) in [-1, 1],
    each noised with fixed noise (JACOBIAN_NOISE_SEED, drawn on the CPU) to each of `timesteps`."""
    generator = torch.Generator().manual_seed(JACOBIAN_NOISE_SEED)
    d = images[0].numel()
    k = min(top_k, d)
    asym, values, vectors, noisy, denoised = [], [], [], [], []
    for t in timesteps:
        noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
        t_batch = torch.full((images.shape[0],), t, device=images.device, dtype=torch.long)
        x_t = q_sample(schedule, images, t_batch, noise)  # (n, C, H, W)
        f = one_step_denoiser(model, schedule, t)
        bases = [eigenbasis(jacobian(f, x, chunk)) for x in x_t]
        asym.append([b.asymmetry for b in bases])
        values.append(torch.stack([b.eigenvalues for b in bases]).cpu().numpy())
        vectors.append(torch.stack([b.top(k).T.reshape(k, *images.shape[1:]) for b in bases]).cpu().numpy())
        noisy.append(x_t.cpu().numpy())
        with torch.no_grad():
            denoised.append(torch.stack([f(x) for x in x_t]).cpu().numpy())
    return JacobianAnalysis(
        timesteps=list(timesteps), asymmetry=np.asarray(asym), eigenvalues=np.stack(values),
        eigenvectors=np.stack(vectors), images=images.cpu().numpy(), noisy=np.stack(noisy), denoised=np.stack(denoised),
    )


# ---------------------------------------------------------------------------------------------
# Pictures


def signed_to_uint8(vector: np.ndarray) -> np.ndarray:
    """An eigenvector (C, H, W) -> uint8 (H, W, C): 0 at mid-grey, +-max|v| at white / black."""
    scale = max(float(np.abs(vector).max()), 1e-12)
    return np.clip(np.rint((vector / scale + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def image_to_uint8(image: np.ndarray) -> np.ndarray:
    """A model-scale image (C, H, W) in [-1, 1] -> uint8 (H, W, C), clipped."""
    return np.clip(np.rint((image + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def eigenvector_row(analysis: JacobianAnalysis, step: int, image: int) -> list[np.ndarray]:
    """Clean image, noisy input, one-step estimate, then the top-k eigenvectors, as uint8 tiles."""
    pictures = [analysis.images[image], analysis.noisy[step, image], analysis.denoised[step, image]]
    return [image_to_uint8(p) for p in pictures] + [signed_to_uint8(v) for v in analysis.eigenvectors[step, image]]


def eigenvector_png(analysis: JacobianAnalysis) -> bytes:
    """One row per (timestep, image): clean, noisy, x0_hat, then the top-k eigenvectors (largest first)."""
    rows = [eigenvector_row(analysis, s, n) for s in range(len(analysis.timesteps))
            for n in range(analysis.images.shape[0])]
    return tiles_png(rows)
