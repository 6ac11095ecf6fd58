"""Keeping SGR's Sigma positive semi-definite (docs/methods.md, SGR, "Sigma is kept positive semi-definite").

With an indefinite Sigma the regularizer 1/2 g^T Sigma g is unbounded below: training could lower the loss by
growing g along Sigma's negative directions, the opposite of what SGR is for. The stationary representation
(eq. 16: one covariance function per channel pair of the *rounded* displacement) can be indefinite even when
the perturbations' true covariance is not, and so can a fixed Sigma read from a file. ``psd: project`` (the
default) removes the negative part:

* dense matrices (a ``full`` Sigma from a file): M - V min(Lambda, 0) V^T from M's eigen-decomposition;
* stationary Sigma: on the 2H x 2W circulant embedding that ``matvec``'s FFT already uses
  (:func:`project_circulant`). Sigma is a principal submatrix of that block-circulant matrix (the window's
  displacements, |dr| < H and |dc| < W), whose eigenvalues are those of the C x C spectral matrices S(k), one per
  frequency k (real symmetric: the kernel is even in the displacement and symmetric in the channel pair).
  Removing the negative part of every S(k) gives the closest positive semi-definite circulant in the Frobenius
  norm, and every principal submatrix of a positive semi-definite matrix is positive semi-definite, so the
  projected Sigma is too. It stays stationary (a function of the displacement, no longer of its rounded length
  alone) and Sigma g stays one FFT product.

  The embedding's entries outside the window (the displacements +-H and +-W, which no two positions have) are
  free: Sigma g never reads them. They hold the covariance function at their rounded length (the last bin past
  it), not zeros: a constant Sigma (rank one, positive semi-definite) then has a positive semi-definite embedding,
  where zeros would make it a Dirichlet kernel with negative lobes and move it by 24%. Fitting the free entries
  by alternating projections (remove the negative part, put the window back, repeat) cut the measured changes
  only partly (docs/methods.md) at 11 times the cost, so the projection is one step.

Only the negative part is subtracted: when no eigenvalue is negative, nothing changes, bitwise. The eigenvalues
of the C x C matrices come from cyclic Jacobi sweeps written here in tensor ops (no host sync on CUDA, where
``torch.linalg.eigh`` reads its error flag back to the host on every call; the projection runs at every
Sigma update inside the training step).
"""

from __future__ import annotations

import torch
from torch import Tensor

PSD_MODES = ("project", "none")  # not "off": YAML reads off as false
# eigenvalues above -TOLERANCE * (largest |eigenvalue|) count as zero: float64 rounding of a semi-definite
# matrix's zero eigenvalues is not a negative part to remove
TOLERANCE = 1e-10
JACOBI_SWEEPS = 6  # cyclic Jacobi converges quadratically: 3 x 3 matrices are at float64 precision after 5


def check_psd_mode(psd: str, owner: str) -> str:
    if psd not in PSD_MODES:
        raise ValueError(f"{owner} psd must be one of {', '.join(PSD_MODES)}, got {psd!r} ('project' keeps Sigma "
                         "positive semi-definite, so that SGR's regularizer is bounded below)")
    return psd


def symmetric_eigen(matrices: Tensor, sweeps: int = JACOBI_SWEEPS) -> tuple[Tensor, Tensor]:
    """Eigenvalues (..., n) and eigenvectors (..., n, n) (columns) of real symmetric matrices (..., n, n), by
    cyclic Jacobi rotations: each rotation in the (p, q) plane zeroes the off-diagonal entry (p, q)."""
    a = matrices.clone()
    n = a.shape[-1]
    if n == 1:  # one channel: the matrix is its eigenvalue
        return a[..., 0], torch.ones_like(a)
    eye = torch.eye(n, dtype=a.dtype, device=a.device).expand_as(a)
    vectors = eye.clone()
    for _ in range(sweeps):  # loops over the matrix size, not over values
        for p in range(n - 1):
            for q in range(p + 1, n):
                theta = 0.5 * torch.atan2(2 * a[..., p, q], a[..., q, q] - a[..., p, p])
                cos, sin = theta.cos(), theta.sin()
                rotation = eye.clone()
                rotation[..., p, p], rotation[..., q, q] = cos, cos
                rotation[..., p, q], rotation[..., q, p] = sin, -sin
                a = rotation.transpose(-1, -2) @ a @ rotation
                vectors = vectors @ rotation
    return a.diagonal(dim1=-2, dim2=-1), vectors


def negative_part(matrices: Tensor, eigen=symmetric_eigen) -> Tensor:
    """V min(Lambda, 0) V^T for real symmetric matrices (..., n, n), computed in float64, in their dtype:
    what :func:`project_psd` subtracts. Exactly zero where no eigenvalue is below -TOLERANCE times the
    largest eigenvalue magnitude of the whole batch."""
    values, vectors = eigen(matrices.double())
    scale = values.abs().amax()
    negative = torch.where(values < -TOLERANCE * scale, values, torch.zeros_like(values))
    return ((vectors * negative.unsqueeze(-2)) @ vectors.transpose(-1, -2)).to(matrices.dtype)


def project_psd(matrices: Tensor, eigen=symmetric_eigen) -> Tensor:
    """The closest positive semi-definite matrices in the Frobenius norm (the negative eigenvalues set to 0)."""
    return matrices - negative_part(matrices, eigen)


def project_circulant(kernel: Tensor) -> Tensor:
    """The (C, C, M, N) kernel of the closest positive semi-definite block circulant, in float64: ``kernel``
    minus the negative part of its real spectrum (the kernel is even in the displacement); ``kernel`` itself,
    bitwise, when there is no negative part."""
    fixed = kernel.double()
    spectrum = torch.fft.rfft2(fixed).real.permute(2, 3, 0, 1)
    negative = negative_part(spectrum).permute(2, 3, 0, 1)
    return fixed - torch.fft.irfft2(negative, s=fixed.shape[-2:])


def project_dense_psd(matrix: Tensor) -> Tensor:
    """:func:`project_psd` of one (d, d) matrix with LAPACK's eigh (Jacobi sweeps are for many small matrices):
    for a fixed Sigma, once, outside the training step."""
    return project_psd(0.5 * (matrix + matrix.T), eigen=torch.linalg.eigh)


def relative_change(before: Tensor, after: Tensor) -> Tensor:
    """||after - before||_F / ||before||_F (0 for an all-zero ``before`` left as it is)."""
    return (after - before).double().norm() / before.double().norm().clamp_min(1e-300)


__all__ = ["PSD_MODES", "check_psd_mode", "negative_part", "project_circulant", "project_dense_psd", "project_psd",
           "relative_change", "symmetric_eigen"]
