"""trainer.jacobian: the one-step denoiser's Jacobian by vmapped VJPs, its eigenbasis and alignment,
checked against matrices written out here (a symmetric linear map, a 2-D DCT shrinkage), a plain
autograd loop, finite differences and scipy's principal angles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from trainer.diffusion import linear_schedule
from trainer.jacobian import (
    JacobianAnalysis,
    alignment,
    eigenbasis,
    jacobian,
    jacobian_analysis,
    one_step_denoiser,
)
from trainer.model import build_dit
from trainer.records import parse_spectrum_record
from trainer.unet import build_unet


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Batched VJPs through small convs are slower with threads fighting over a shared 2-core box."""


def random_orthogonal(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def linear_map(matrix: torch.Tensor, shape: tuple[int, ...]):
    return lambda x: (matrix @ x.reshape(-1)).reshape(shape)


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II: row k is sqrt(2/n) c_k cos(pi (2 i + 1) k / (2 n)), c_0 = 1/sqrt(2), else 1."""
    i = np.arange(n)
    rows = [np.sqrt(2.0 / n) * (1 / np.sqrt(2) if k == 0 else 1.0) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
            for k in range(n)]
    return np.array(rows)


def test_a_symmetric_linear_denoiser_gives_back_its_matrix_eigenvalues_and_eigenvectors():
    d, shape = 16, (1, 4, 4)
    q = random_orthogonal(d, 0)
    eigenvalues = np.linspace(1.0, 0.05, d)  # distinct, descending
    matrix = torch.from_numpy(q @ np.diag(eigenvalues) @ q.T)
    x = torch.randn(shape, dtype=torch.float64)

    J = jacobian(linear_map(matrix, shape), x, chunk=5)  # chunks of 5, 5, 5, 1 basis vectors
    np.testing.assert_allclose(J.numpy(), matrix.numpy(), rtol=1e-6, atol=1e-12)

    basis = eigenbasis(J)
    np.testing.assert_allclose(basis.eigenvalues.numpy(), eigenvalues, rtol=1e-6)
    cosines = np.abs(np.sum(basis.eigenvectors.numpy() * q, axis=0))  # |<v_i, q_i>|, up to sign
    np.testing.assert_allclose(cosines, np.ones(d), rtol=1e-6)
    assert basis.asymmetry == pytest.approx(0.0, abs=1e-12)
    assert basis.trace == pytest.approx(eigenvalues.sum(), rel=1e-9)
    assert basis.participation_ratio == pytest.approx(eigenvalues.sum() ** 2 / (eigenvalues**2).sum(), rel=1e-9)


def test_asymmetry_is_the_relative_frobenius_norm_of_the_antisymmetric_part():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 6))
    expected = np.linalg.norm(a - a.T) / np.linalg.norm(a)
    J = jacobian(linear_map(torch.from_numpy(a), (6,)), torch.zeros(6, dtype=torch.float64))
    assert eigenbasis(J).asymmetry == pytest.approx(expected, rel=1e-9)


def test_a_dct_shrinkage_denoiser_is_recovered_in_its_basis():
    n = 8
    dct = dct_matrix(n)
    basis_2d = np.kron(dct, dct)  # row (u * n + v): the (u, v) 2-D cosine, orthonormal
    u, v = np.divmod(np.arange(n * n), n)
    factors = np.exp(-(u + 1.1 * v) / 3.0)  # distinct shrinkage factors, decaying with frequency
    matrix = torch.from_numpy(basis_2d.T @ np.diag(factors) @ basis_2d)
    x = torch.randn(1, n, n, dtype=torch.float64)

    found = eigenbasis(jacobian(linear_map(matrix, (1, n, n)), x, chunk=16))
    order = np.argsort(-factors)
    np.testing.assert_allclose(found.eigenvalues.numpy(), factors[order], rtol=1e-6)
    k = 10
    expected_top = basis_2d[order[:k]].T  # (d, k)
    angles = scipy.linalg.subspace_angles(found.top(k).numpy(), expected_top)
    assert np.max(angles) < 1e-6
    # Each eigenvector is its own cosine (the factors are distinct), up to sign.
    cosines = np.abs(np.sum(found.top(k).numpy() * expected_top, axis=0))
    np.testing.assert_allclose(cosines, np.ones(k), rtol=1e-6)


def perturbed_unet(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_unet("UNet-T", image_size=8, in_channels=1).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # the last conv starts at zero: move every weight off its init
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_the_vmap_path_equals_a_loop_of_autograd_grad_and_finite_differences():
    model = perturbed_unet(torch.float64)
    f = one_step_denoiser(model, linear_schedule(), 300)
    x = torch.randn(1, 8, 8, dtype=torch.float64)

    J = jacobian(f, x, chunk=24)
    rows = []
    for i in range(x.numel()):
        xi = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(f(xi).reshape(-1)[i], xi)
        rows.append(grad.reshape(-1))
    np.testing.assert_allclose(J.numpy(), torch.stack(rows).numpy(), rtol=1e-10, atol=1e-12)

    i, j, h = 27, 35, 1e-6
    step = torch.zeros_like(x).reshape(-1)
    step[j] = h
    with torch.no_grad():
        plus, minus = f(x + step.reshape(x.shape)), f(x - step.reshape(x.shape))
    central = float((plus.reshape(-1)[i] - minus.reshape(-1)[i]) / (2 * h))
    assert J[i, j].item() == pytest.approx(central, rel=1e-6)
    assert abs(J[i, j].item()) > 1e-3  # a real entry, not two zeros agreeing


@pytest.mark.parametrize("backend", ["dense", "banded"])
def test_the_vmap_path_runs_through_dit_attention(backend):
    torch.manual_seed(0)
    model = build_dit("DiT-P/1", image_size=4, in_channels=1, windows=[3, 3, None, None, None, None],
                      attention_backend=backend).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    f = one_step_denoiser(model, linear_schedule(), 500)
    x = torch.randn(1, 4, 4)
    J = jacobian(f, x, chunk=7)
    xi = x.clone().requires_grad_(True)
    loop = torch.stack([torch.autograd.grad(f(xi).reshape(-1)[i], xi)[0].reshape(-1) for i in range(16)])
    np.testing.assert_allclose(J.numpy(), loop.numpy(), rtol=1e-4, atol=1e-5)


def test_alignment_is_one_for_the_same_subspace_and_near_k_over_d_for_random_ones():
    model = perturbed_unet(torch.float64)
    basis = eigenbasis(jacobian(one_step_denoiser(model, linear_schedule(), 300), torch.randn(1, 8, 8, dtype=torch.float64)))
    k = 6
    top = basis.top(k)
    assert alignment(top, top) == pytest.approx(1.0, rel=1e-12)
    rotation = torch.from_numpy(random_orthogonal(k, 3))  # another basis of the same subspace
    assert alignment(top, top @ rotation) == pytest.approx(1.0, rel=1e-12)

    d, k, pairs = 256, 8, 50
    rng = np.random.default_rng(4)
    values = [alignment(torch.from_numpy(np.linalg.qr(rng.standard_normal((d, k)))[0]),
                        torch.from_numpy(np.linalg.qr(rng.standard_normal((d, k)))[0])) for _ in range(pairs)]
    # E||U1^T U2||_F^2 = k^2 / d for independent uniformly random subspaces; the mean of 50 is within 10%.
    assert np.mean(values) == pytest.approx(k / d, rel=0.1)
    with pytest.raises(ValueError, match="one shape"):
        alignment(top, basis.top(k + 1))


def test_the_analysis_of_a_model_reports_per_timestep_and_round_trips_its_file(tmp_path):
    model = perturbed_unet(torch.float32)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    analysis = jacobian_analysis(model, linear_schedule(), images, [100, 700], top_k=4, chunk=32)

    assert analysis.eigenvalues.shape == (2, 2, 64) and analysis.eigenvectors.shape == (2, 2, 4, 1, 8, 8)
    metrics = analysis.metrics()
    assert set(metrics) == {f"jac_{m}.t{t}" for m in ("asymmetry", "trace", "pr") for t in (100, 700)}
    first = analysis.eigenvalues[0, 0]
    assert metrics["jac_trace.t100"] == pytest.approx(analysis.eigenvalues[0].sum(axis=1).mean(), rel=1e-5)
    assert np.all(np.diff(first) <= 0)  # descending
    vectors = analysis.eigenvectors[0, 0].reshape(4, -1)
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(4), atol=1e-5)
    spectrum = parse_spectrum_record(analysis.spectrum_record())
    np.testing.assert_allclose(spectrum[700], analysis.eigenvalues[1].mean(axis=0), rtol=1e-6)

    analysis.save(tmp_path)
    again = JacobianAnalysis.from_npz((tmp_path / "jacobian.npz").read_bytes())
    assert again.timesteps == [100, 700]
    np.testing.assert_array_equal(again.eigenvectors, analysis.eigenvectors)
    assert (tmp_path / "jacobian_eigenvectors.png").read_bytes()[:4] == b"\x89PNG"
    # The same model, images and noise give the same Jacobian: the analysis noise is fixed.
    repeat = jacobian_analysis(model, linear_schedule(), images, [100, 700], top_k=4, chunk=64)
    np.testing.assert_allclose(repeat.eigenvalues, analysis.eigenvalues, rtol=1e-5, atol=1e-6)
    assert math.isfinite(metrics["jac_pr.t700"]) and metrics["jac_pr.t700"] > 1
