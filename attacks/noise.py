"""Random-noise baselines: uniform noise and SGR's long-range correlated (LRC) noise attack.

Neither uses a gradient. Each draws ``samples`` perturbed copies of every example, clamps each to
``bounds``, and keeps per example the worst one: a misclassified copy beats a correct one, then the higher
cross-entropy wins (:func:`advtrain.attacks.core.worst_of_restarts`, one no-grad forward per draw). So an example
counts as robust only if every draw is classified correctly. Draws are taken one after another from
``generator``.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn

from .budget import check_steps, parse_budget
from .core import random_start, worst_of_restarts
from .losses import cross_entropy

MAX_POSITIONS = 4096  # the dense (H W)^2 kernel: 64 x 64 images (128 MB in float64) at most
_JITTERS = (0.0, *(10.0**k for k in range(-12, -3)))
_FACTORS: dict[tuple, Tensor] = {}  # Cholesky factors, reused across calls and batches
_CACHE_SIZE = 8  # a zeta sweep on one data set fits; a 4096-position factor is 64 MB in float32


def _check(x: Tensor, y: Tensor) -> None:
    # not advtrain.attacks.core.check_inputs: no gradient is needed, so inference mode is fine here
    if not x.is_floating_point():
        raise TypeError(f"attacks take floating-point inputs in their natural range, got {x.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"batch sizes differ: x has {x.shape[0]}, y has {y.shape[0]}")


def _worst_of(model: nn.Module, x: Tensor, y: Tensor, samples: int, draw) -> Tensor:
    check_steps(samples, "samples")
    _check(x, y)
    with torch.no_grad():
        return worst_of_restarts(model, x.detach(), y, samples, draw, cross_entropy)


def uniform_noise(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, samples: int = 1,
                  bounds: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None) -> Tensor:
    """x + U(-eps, eps) per coordinate, clamped to ``bounds``: the sanity baseline of SGR's tables (Roth
    et al. 2018). With ``samples > 1``, the worst of that many draws per example."""
    eps = parse_budget(eps)
    return _worst_of(model, x, y, samples,
                     lambda: (x.detach() + random_start(x, eps, "uniform", generator=generator)).clamp(*bounds))


def _cholesky(matrix: Tensor, what: str) -> Tensor:
    """Lower Cholesky factor of a float64 positive semi-definite matrix. K for a large zeta (nearly all
    ones) and a data set's covariance (constant border pixels, fewer images than pixels) are singular in
    floating point, so the smallest jitter of 0, 1e-12, 1e-11, ..., 1e-4 times the mean diagonal that lets
    the factorization succeed is added to the diagonal (the sampled covariance is then off by that much)."""
    scale = matrix.diagonal().mean()
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for jitter in _JITTERS:
        factor, info = torch.linalg.cholesky_ex(matrix + (jitter * scale) * eye)
        if info.item() == 0:  # once per factor, outside any loop over draws
            return factor
    raise ValueError(f"{what} is not positive semi-definite (Cholesky fails even with jitter {_JITTERS[-1]:g})")


def _cached(key: tuple, build, device: torch.device, dtype: torch.dtype) -> Tensor:
    key = (*key, str(device), dtype)
    if key not in _FACTORS:
        if len(_FACTORS) >= _CACHE_SIZE:
            _FACTORS.pop(next(iter(_FACTORS)))  # drop the oldest
        _FACTORS[key] = build().to(device=device, dtype=dtype)
    return _FACTORS[key]


def _grid_kernel(grid: tuple[int, ...], zeta: float) -> Tensor:
    """K_pq = exp(-||p - q||_2 / zeta) over the positions of ``grid`` in row-major order (x.flatten's)."""
    axes = [torch.arange(n, dtype=torch.float64) for n in grid]
    positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))
    distances = torch.cdist(positions, positions, compute_mode="donot_use_mm_for_euclid_dist")  # exact 0, 1, ...
    return torch.exp(-distances / zeta)


def lrc_noise(shape: tuple[int, ...], *, zeta: float = 4.0, channel_correlation: float = 0.5,
              generator: torch.Generator | None = None, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """Unit-scale LRC noise of ``shape`` (B, C, H, W) or (B, C, L): each example ~ N(0, C (x) K) in
    channel-major flattening, C = channels x channels with 1 on the diagonal and ``channel_correlation``
    off it, K_pq = exp(-||p - q||_2 / zeta) over the positions (a line for (B, C, L)).

    Sampled as L_C z L_K^T with z ~ N(0, I) of shape (B, C, P) and L_C L_C^T = C, L_K L_K^T = K: entry
    (c, p) is sum_{c', q} L_C[c, c'] z[c', q] L_K[p, q], whose covariance with entry (d, r) is
    C[c, d] K[p, r], i.e. the (c P + p, d P + r) entry of C (x) K. The factors are computed once per
    (grid, channels, zeta, channel_correlation, device, dtype) in float64 and cached.
    """
    if len(shape) not in (3, 4):
        raise ValueError(f"LRC noise needs (B, C, H, W) images or (B, C, L) signals, got shape {tuple(shape)}")
    if not zeta > 0:
        raise ValueError(f"zeta must be > 0, got {zeta}")
    batch, channels, grid = shape[0], shape[1], tuple(shape[2:])
    positions = math.prod(grid)
    if positions > MAX_POSITIONS:
        raise ValueError(f"LRC noise builds a dense (positions x positions) kernel: {grid} has {positions} "
                         f"positions, more than {MAX_POSITIONS} (64 x 64); ImageNet-size images and "
                         f"waveforms are not supported")
    device = torch.device("cpu") if device is None else torch.device(device)

    def channel_factor() -> Tensor:
        c = torch.full((channels, channels), float(channel_correlation), dtype=torch.float64)
        return _cholesky(c.fill_diagonal_(1.0), f"the channel correlation matrix (rho={channel_correlation})")

    l_c = _cached(("C", channels, channel_correlation), channel_factor, device, dtype)
    l_k = _cached(("K", grid, zeta), lambda: _cholesky(_grid_kernel(grid, zeta), f"K (zeta={zeta})"), device, dtype)
    z = torch.randn((batch, channels, positions), generator=generator, device=device, dtype=dtype)
    return (l_c @ z @ l_k.T).reshape(shape)


def covariance_of(x: Tensor) -> Tensor:
    """The (d, d) covariance of a stack of n inputs flattened to d = C H W: float64, mean-centred, divided
    by n - 1. Save it with ``torch.save`` and pass the path as ``lrc(..., covariance=path)``."""
    if x.shape[0] < 2:
        raise ValueError("a covariance needs at least 2 inputs")
    flat = x.detach().flatten(1).double()
    flat = flat - flat.mean(0)
    return flat.T @ flat / (x.shape[0] - 1)


def _file_factor(path: str, d: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lrc: covariance file {path!r} not found (write one with "
                                f"torch.save(advtrain.attacks.noise.covariance_of(x), path))")
    stat = os.stat(path)

    def build() -> Tensor:
        matrix = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(matrix, Tensor) or matrix.shape != (d, d):
            got = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(f"lrc: {path!r} holds {got}, but inputs of this shape need a ({d}, {d}) covariance")
        matrix = matrix.double()
        return _cholesky(matrix / matrix.diagonal().mean(), f"the covariance in {path!r}")

    return _cached(("file", os.path.abspath(path), stat.st_mtime_ns, stat.st_size, d), build, device, dtype)


def lrc(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, zeta: float = 4.0, samples: int = 100,
        channel_correlation: float = 0.5, covariance: str | None = None, bounds: tuple[float, float] = (0.0, 1.0),
        generator: torch.Generator | None = None) -> Tensor:
    """The long-range correlated noise attack of SGR (Roth, Kilcher, Hofmann 2018, section 4.3): the worst
    of ``samples`` (paper: k = 100) Gaussian perturbations x + eps * n, n ~ N(0, C (x) K) (see
    :func:`lrc_noise`; the paper's zeta in {1, 2, 4, 8, 16}), each clamped to ``bounds``.

    eps is the per-pixel standard deviation of the noise: our reading of the paper, whose equations were
    lost (its eps grid runs over [0.01, 0.7]).

    ``covariance``: the path of a torch file holding a (d, d) covariance over the flattened input
    (d = C H W), e.g. the data set's own (:func:`covariance_of`), used instead of C (x) K. It is rescaled to
    mean diagonal 1, so the mean per-pixel variance is eps^2 (eps is the root-mean-square standard
    deviation); then n = L z with L its Cholesky factor. Any input shape works with a file.
    """
    eps = parse_budget(eps)
    compute = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 inputs: noise still drawn in float32
    if covariance is None:
        def unit() -> Tensor:
            return lrc_noise(x.shape, zeta=zeta, channel_correlation=channel_correlation, generator=generator,
                             device=x.device, dtype=compute)
    else:
        d = x[0].numel()
        factor = _file_factor(str(covariance), d, x.device, compute)

        def unit() -> Tensor:
            z = torch.randn((x.shape[0], d), generator=generator, device=x.device, dtype=compute)
            return (z @ factor.T).reshape(x.shape)

    def draw() -> Tensor:
        # noise in float32 even under autocast: a bf16 matmul over 1024 positions distorts the covariance
        with torch.autocast(x.device.type, enabled=False):
            return (x.detach() + eps * unit()).clamp(*bounds).to(x.dtype)

    return _worst_of(model, x, y, samples, draw)
