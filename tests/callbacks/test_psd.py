"""advtrain.callbacks.covariance.psd: SGR's Sigma kept positive semi-definite. The stationary estimate of long-range
correlated noise and of the digits' data covariance is indefinite and its projection is not; a positive semi-definite
Sigma is left bitwise as it is; Sigma g by FFT equals the dense projected matrix times g; the circulant projection
equals one written with dense numpy matrices; the Jacobi eigen-decomposition equals numpy's; a fixed full matrix is
projected once at load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from advtrain.attacks.noise import covariance_of
from advtrain.callbacks.covariance import StationaryCovariance, load_covariance
from advtrain.callbacks.covariance.psd import project_circulant, symmetric_eigen


def eigenvalues(sigma) -> np.ndarray:
    return np.linalg.eigvalsh(sigma.to_dense().double().numpy())


def lrc_perturbations(n: int = 10_000) -> torch.Tensor:
    """Gaussian perturbations with covariance A (x) exp(-r / 2) on 3 x 8 x 8 (A: 1 on the diagonal, 0.5 off it),
    the long-range noise of SGR's section 4.3, whose true covariance is positive definite."""
    channels = np.full((3, 3), 0.5) + 0.5 * np.eye(3)
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    positions = np.stack([rows.ravel(), cols.ravel()], 1)
    distance = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    true = np.kron(channels, np.exp(-distance / 2))
    assert np.linalg.eigvalsh(true).min() > 0.1
    factor = torch.from_numpy(np.linalg.cholesky(true))
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, 192, generator=gen, dtype=torch.float64) @ factor.T).reshape(n, 3, 8, 8).float()


def test_long_range_noise_estimate_is_indefinite_and_its_projection_is_not():
    xi = lrc_perturbations()
    raw = StationaryCovariance((3, 8, 8), psd="none")
    raw.update(xi, 1.0)
    before = eigenvalues(raw)
    assert before.min() < -0.1 and before.max() > 20  # the case: about -0.139 and 26
    projected = StationaryCovariance((3, 8, 8))  # psd: project is the default
    projected.update(xi, 1.0)
    assert torch.equal(projected.functions, raw.functions)  # the estimate itself is kept; only its use changes
    after = eigenvalues(projected)
    assert after.min() >= -1e-6 * after.max()
    change = float(projected.psd_change())
    moved = np.linalg.norm(projected.to_dense().double().numpy() - raw.to_dense().double().numpy())
    assert change == pytest.approx(moved / np.linalg.norm(raw.to_dense().double().numpy()), rel=1e-4)
    assert 0 < change < 0.05


def test_digits_data_covariance_as_a_fixed_sigma_is_projected(tmp_path):
    x = torch.from_numpy(load_digits().data / 16.0).reshape(-1, 1, 8, 8)
    torch.save(covariance_of(x), tmp_path / "digits.pt")
    raw = load_covariance(tmp_path / "digits.pt", "stationary", (1, 8, 8), psd="none")
    before = eigenvalues(raw)
    assert (before < 0).sum() >= 2 and before.min() < -0.005  # the issue: 4 negative, the smallest -0.0134
    projected = load_covariance(tmp_path / "digits.pt", "stationary", (1, 8, 8))
    after = eigenvalues(projected)
    assert after.min() >= -1e-6 * after.max()
    assert 0 < float(projected.psd_change()) < 0.1


def test_a_full_matrix_from_a_file_loses_its_negative_eigenvalues_once(tmp_path):
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(200, 12, generator=gen, dtype=torch.float64)
    psd_matrix = covariance_of(data.reshape(200, 3, 4))
    torch.save(psd_matrix, tmp_path / "psd.pt")
    kept = load_covariance(tmp_path / "psd.pt", "full", (3, 4), dtype=torch.float64)
    assert torch.equal(kept.matrix, psd_matrix) and float(kept.psd_change()) == 0.0  # nothing to remove
    indefinite = psd_matrix - 0.8 * torch.eye(12, dtype=torch.float64)
    torch.save(indefinite, tmp_path / "indefinite.pt")
    values, vectors = np.linalg.eigh(indefinite.numpy())
    assert values.min() < 0
    reference = (vectors * np.clip(values, 0, None)) @ vectors.T  # numpy's own eigen-clip
    projected = load_covariance(tmp_path / "indefinite.pt", "full", (3, 4), dtype=torch.float64)
    np.testing.assert_allclose(projected.matrix.numpy(), reference, atol=1e-12)
    expected = np.linalg.norm(reference - indefinite.numpy()) / np.linalg.norm(indefinite.numpy())
    assert float(projected.psd_change()) == pytest.approx(expected, rel=1e-9)
    off = load_covariance(tmp_path / "indefinite.pt", "full", (3, 4), psd="none", dtype=torch.float64)
    assert torch.equal(off.matrix, indefinite)


def positive_semi_definite_cases() -> dict[str, StationaryCovariance]:
    """Stationary Sigmas that are positive semi-definite, each for a different reason."""
    channels = torch.tensor([[1.0, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 1.0]])
    short = torch.zeros(11)
    short[0], short[1] = 1.0, 0.1  # on the lattice: 1 + 0.1 * (2 cos u + 2 cos v + 4 cos u cos v) >= 0.2
    constant = torch.ones(1, 1, 11)  # rank one: zeros outside the window would make its embedding indefinite
    return {"identity": StationaryCovariance((3, 8, 8)),
            "short_range": StationaryCovariance((3, 8, 8), functions=channels[:, :, None] * short),
            "constant": StationaryCovariance((1, 8, 8), functions=constant)}


@pytest.mark.parametrize("case", ["identity", "short_range", "constant"])
def test_the_projection_changes_nothing_on_a_positive_semi_definite_sigma(case):
    projected = positive_semi_definite_cases()[case]
    raw = StationaryCovariance(projected.shape, functions=projected.functions.clone(), psd="none")
    assert eigenvalues(raw).min() >= -1e-6 * eigenvalues(raw).max()  # the premise
    assert float(projected.psd_change()) == 0.0
    assert torch.equal(projected.to_dense(), raw.to_dense())
    g = torch.randn(4, *projected.shape, generator=torch.Generator().manual_seed(2))
    for method in ("fft", "conv"):
        projected.method = raw.method = method
        projected._changed(), raw._changed()
        assert torch.equal(projected.matvec(g), raw.matvec(g)), method


def test_fft_sigma_g_equals_the_dense_projected_matrix_times_g():
    sigma = StationaryCovariance((3, 8, 8), dtype=torch.float64)
    sigma.update(lrc_perturbations(2_000).double(), 1.0)
    assert float(sigma.psd_change()) > 0  # the projection did something
    dense = sigma.to_dense()
    g = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = (g.flatten(1) @ dense.T).reshape(g.shape)
    for method in ("fft", "conv"):
        sigma.method = method
        sigma._changed()
        torch.testing.assert_close(sigma.matvec(g), expected, rtol=1e-10, atol=1e-10)


def dense_circulant(kernel: np.ndarray) -> np.ndarray:
    """The (C M N, C M N) block-circulant matrix of a (C, C, M, N) kernel: entry ((c, p), (c', q)) is
    kernel[c, c', p - q mod (M, N)]."""
    c, _, m, n = kernel.shape
    rows, cols = np.meshgrid(np.arange(m), np.arange(n), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    blocks = kernel[:, :, (rows[:, None] - rows[None]) % m, (cols[:, None] - cols[None]) % n]
    return blocks.transpose(0, 2, 1, 3).reshape(c * m * n, c * m * n)


def test_circulant_projection_equals_the_eigen_clip_of_the_dense_block_circulant():
    """project_circulant (FFT and Jacobi) against numpy: clip the dense block-circulant matrix's eigenvalues and
    read the kernel off its first block column (the projection of a circulant is circulant)."""
    c, h, w = 2, 5, 6
    functions = torch.randn(c, c, 7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    functions = (functions + functions.transpose(0, 1)) / 2 + 3 * torch.eye(c, dtype=torch.float64)[:, :, None]
    kernel = StationaryCovariance((c, h, w), functions=functions, dtype=torch.float64, psd="none")._grid_kernel()
    values, vectors = np.linalg.eigh(dense_circulant(kernel.numpy()))
    assert values.min() < -1e-3  # the embedding is indefinite
    clipped = (vectors * np.clip(values, 0, None)) @ vectors.T
    column = clipped.reshape(c, 4 * h * w, c, 4 * h * w)[:, :, :, 0]  # [c, p, c'] = kernel[c, c', p]
    expected = column.reshape(c, 2 * h, 2 * w, c).transpose(0, 3, 1, 2)
    ours = project_circulant(kernel)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-10)
    assert np.linalg.eigvalsh(dense_circulant(ours.numpy())).min() > -1e-10


def test_jacobi_eigen_decomposition_matches_numpy():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(64, 3, 3, generator=gen, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0]
    repeated = rotation @ torch.diag(torch.tensor([1.0, 1.0, -2.0], dtype=torch.float64)) @ rotation.T
    matrices = torch.cat([a + a.transpose(1, 2), repeated[None], torch.eye(3, dtype=torch.float64)[None]])
    values, vectors = symmetric_eigen(matrices)
    np.testing.assert_allclose(np.sort(values.numpy(), -1), np.linalg.eigvalsh(matrices.numpy()), atol=1e-12)
    np.testing.assert_allclose((vectors.transpose(1, 2) @ vectors).numpy(), np.broadcast_to(np.eye(3), (66, 3, 3)),
                               atol=1e-12)
    np.testing.assert_allclose((vectors * values[:, None]) @ vectors.transpose(1, 2), matrices, atol=1e-12)


def test_bad_psd_mode_is_refused_in_one_line():
    with pytest.raises(ValueError, match="psd must be one of project, none"):
        StationaryCovariance((1, 8, 8), psd="clip")
