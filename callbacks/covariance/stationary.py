"""The stationary covariance of SGR (Roth, Kilcher, Hofmann 2018, eq. 16):
Sigma_ij = CovFun_{c,c'}(round(||p_i - p_j||)).

One covariance function of the rounded pixel displacement r = 0, 1, ..., R - 1 per channel pair (c, c'), intra-
and inter-channel, with R - 1 = round(sqrt((H - 1)^2 + (W - 1)^2)) the longest displacement. Sigma is symmetric
because CovFun_{c,c'} = CovFun_{c',c} (the estimate pools the displacements d and -d, which swap the pair).

* Estimate (our choice of the paper's "batch autocorrelations binned by radius", which its lost equations do not
  pin down): the pooled mean of xi_i[c, p] xi_i[c', q] over the batch and over every ordered pair of positions
  (p, q) at rounded distance r. The autocorrelation of each channel pair at every displacement comes from one
  zero-padded FFT (size 2H x 2W, so no wrap-around), the displacements are summed per radius bin (a matmul with
  a 0/1 binning matrix: deterministic, unlike a scatter on CUDA) and divided by the number of position pairs
  in the bin (the sum of the overlap counts (H - |dr|)(W - |dc|) of its displacements). This is the least-squares
  projection of the empirical d x d second-moment matrix onto stationary matrices (:meth:`from_dense` does that
  projection for a given matrix, e.g. a data set's covariance), so ``full`` and ``stationary`` agree on
  stationary data.
* Sigma g is a convolution of g with the kernel K[c, c', dr, dc] = CovFun_{c,c'}(round(sqrt(dr^2 + dc^2))) of
  size (2H - 1) x (2W - 1): ``method="fft"`` (default) multiplies spectra on a 2H x 2W grid, ``"conv"`` runs
  ``conv2d``. At CIFAR shape on a CPU the FFT is much faster (bench/covariance_cost.py measures both: about 37
  MMAC per example for the convolution). Memory is O(C^2 H W) for the kernel; the d x d matrix is never built
  (only :meth:`to_dense`, for tests and small inputs, builds it).
* Rounding the displacement can make this Sigma indefinite although the perturbations' covariance is not.
  ``psd="project"`` (default) removes the negative part on the circulant embedding (:mod:`.psd`), so that Sigma g
  multiplies by the projected Sigma; ``functions`` keep the estimate itself (the running state and its plots).

Inputs (C, H, W), or (C, L) signals taken as H = 1.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .psd import check_psd_mode, project_circulant
from .sigma_base import Covariance

METHODS = ("fft", "conv")


def image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of an input shape: images as they are, (C, L) signals as (C, 1, L)."""
    if len(shape) == 3:
        return tuple(shape)
    if len(shape) == 2:
        return (shape[0], 1, shape[1])
    raise ValueError(f"a stationary covariance needs (C, H, W) images or (C, L) signals, got input shape {shape}; "
                     "use representation 'full'")


def _signed_displacements(h: int, w: int) -> tuple[Tensor, Tensor]:
    """The row and column displacement of each index of the circular 2H x 2W FFT grid: index k stands for k, or
    k - 2H past the middle (the displacement H is -H)."""
    dr, dc = torch.arange(2 * h), torch.arange(2 * w)
    return torch.where(dr < h, dr, dr - 2 * h), torch.where(dc < w, dc, dc - 2 * w)


def _grid_radius(h: int, w: int) -> Tensor:
    """(2H, 2W) int64: round(sqrt(dr^2 + dc^2)) of each displacement of the circular grid. The rounding never
    meets a tie: dr^2 + dc^2 is an integer."""
    dr, dc = _signed_displacements(h, w)
    return (dr[:, None] ** 2 + dc[None, :] ** 2).double().sqrt().round().long()


@functools.lru_cache(maxsize=16)
def _radius_of_displacements(h: int, w: int) -> tuple[Tensor, int]:
    """(2H, 2W) int64: the radius bin of each displacement on the circular FFT grid (:func:`_grid_radius`), with
    bin R (past the last) for the displacements +-H / +-W that no two positions have; and R."""
    dr, dc = _signed_displacements(h, w)
    radius = _grid_radius(h, w)
    bins = int(round(((h - 1) ** 2 + (w - 1) ** 2) ** 0.5)) + 1
    invalid = (dr.abs() >= h)[:, None] | (dc.abs() >= w)[None, :]
    return torch.where(invalid, torch.full_like(radius, bins), radius), bins


@functools.lru_cache(maxsize=16)
def _embedding_radius(h: int, w: int) -> Tensor:
    """(2H, 2W) int64: the radius bin of each displacement of the circular grid, the displacements +-H and +-W
    outside the window included, clamped to the last bin."""
    return _grid_radius(h, w).clamp_max(_radius_of_displacements(h, w)[1] - 1)


@functools.lru_cache(maxsize=16)
def _overlap(h: int, w: int) -> Tensor:
    """(2H, 2W) float64: the number of ordered position pairs (p, q) at each displacement of the circular grid."""
    dr, dc = _signed_displacements(h, w)
    return ((h - dr.abs()).clamp_min(0)[:, None] * (w - dc.abs()).clamp_min(0)[None, :]).double()


@functools.lru_cache(maxsize=16)
def _pairs_per_bin(h: int, w: int) -> Tensor:
    """(R,) float64: the number of ordered position pairs (p, q) at each rounded distance."""
    radius, bins = _radius_of_displacements(h, w)
    pairs = torch.zeros(bins + 1, dtype=torch.float64)
    return pairs.index_add_(0, radius.flatten(), _overlap(h, w).flatten())[:bins]


def position_radius(h: int, w: int) -> Tensor:
    """(H W, H W) int64: round(||p - q||) for positions in row-major order (``x.flatten``'s)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    squared = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    return squared.double().sqrt().round().long()


def _cross_spectra(spectrum: Tensor) -> Tensor:
    """cross[c, d] = sum_b spectrum[b, c] conj(spectrum[b, d]), one pair at a time (the lower triangle by conjugate
    symmetry): an einsum over b makes one tiny complex matmul per frequency, about 10 times slower on the CPU."""
    c = spectrum.shape[1]
    cross = spectrum.new_empty(c, c, *spectrum.shape[2:])
    for i in range(c):  # channels: a Python loop over shapes, not values
        for j in range(i, c):
            cross[i, j] = (spectrum[:, i] * spectrum[:, j].conj()).sum(0)
            if j != i:
                cross[j, i] = cross[i, j].conj()
    return cross


class StationaryCovariance(Covariance):
    """Sigma as (C, C, R) covariance functions of rounded displacement (eq. 16). Starts as the identity
    (CovFun_{c,c}(0) = 1, all else 0) unless ``functions`` are given.

    Args:
        shape: one input's shape, (C, H, W) or (C, L).
        functions: (C, C, R) values, symmetric in (c, c').
        mean: the mean perturbation (input shape); zeros by default.
        method: ``fft`` or ``conv`` for :meth:`matvec`.
        psd: ``project`` (default): :meth:`matvec` and :meth:`to_dense` use Sigma with the negative part of its
            circulant embedding removed (:mod:`.psd`; nothing changes when there is none); ``none``: the binned
            estimate as it is, which can be indefinite.
    """

    def __init__(self, shape: tuple[int, ...], functions: Tensor | None = None, mean: Tensor | None = None,
                 method: str = "fft", dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 psd: str = "project"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        self.psd = check_psd_mode(psd, "StationaryCovariance")
        c, h, w = image_shape(tuple(shape))
        bins = _radius_of_displacements(h, w)[1]
        if functions is None:
            functions = torch.zeros(c, c, bins, dtype=dtype, device=device)
            functions[range(c), range(c), 0] = 1.0
        elif tuple(functions.shape) != (c, c, bins):
            raise ValueError(f"covariance functions of inputs {tuple(shape)} have shape {(c, c, bins)}, "
                             f"got {tuple(functions.shape)}")
        super().__init__(shape, functions, mean)
        self.image = (c, h, w)
        self.method = method
        self._changed()  # no derived tensors yet: the spectrum, kernels and projection come on first use

    @property
    def functions(self) -> Tensor:
        return self.values

    def _changed(self) -> None:
        self._spectrum = self._kernel = self._used_grid = self._change = None

    def _grid_kernel(self) -> Tensor:
        """(C, C, 2H, 2W): K at every displacement of the circular grid. Sigma g reads only the window's
        displacements (|dr| < H, |dc| < W); the others, +-H and +-W, which no two positions have, get the
        function at their rounded length (the last bin past it), which the PSD projection's embedding uses."""
        c, h, w = self.image
        radius = self._cached("embedding_radius", lambda: _embedding_radius(h, w))
        return self.values[:, :, radius]

    def _projection(self) -> tuple[Tensor, Tensor]:
        """The real (C, C, 2H, W + 1) spectrum and the (C, C, 2H, 2W) grid kernel of the Sigma that
        :meth:`matvec` multiplies by (the kernel is even in the displacement, so its spectrum is real), projected
        with ``psd="project"`` (:func:`.psd.project_circulant`: bitwise the raw kernel when its embedding is
        positive semi-definite); cached until the values change."""
        if self._spectrum is None:
            grid = self._grid_kernel()
            if self.psd == "project":
                raw = grid.double()
                projected = project_circulant(raw)
                # the window norm weighs each displacement by its position pairs: those outside count 0
                change = self._window_norm(projected - raw) / self._window_norm(raw).clamp_min(1e-300)
                self._change = change.to(grid.dtype)
                grid = projected.to(grid.dtype)  # bitwise the raw kernel when nothing moved
            else:
                self._change = grid.new_zeros(())
            self._spectrum, self._used_grid = torch.fft.rfft2(grid).real, grid
        return self._spectrum, self._used_grid

    def _window_norm(self, grid: Tensor) -> Tensor:
        """The Frobenius norm of the d x d matrix that a grid kernel defines over the H x W window: each
        displacement's C x C block appears once per ordered position pair at that displacement."""
        c, h, w = self.image
        overlap = self._cached("overlap", lambda: _overlap(h, w))
        return (overlap * grid.square().sum((0, 1))).sum().sqrt()

    def psd_change(self) -> Tensor:
        """||projected Sigma - Sigma||_F / ||Sigma||_F over the window (a tensor; 0 with ``psd="none"`` or when
        Sigma's circulant embedding is already positive semi-definite)."""
        self._projection()
        return self._change

    # ---- Sigma g ----------------------------------------------------------------------------------------
    def matvec(self, g: Tensor) -> Tensor:
        """Sigma g_i for every example of g (B, *shape): a convolution with the kernel K, differentiable in g
        (double backprop through SGR's loss). Runs in float32 with autocast off (no bf16 FFT on CPUs)."""
        c, h, w = self.image
        batch = g.shape[0]
        with torch.autocast(g.device.type, enabled=False):
            x = g.reshape(batch, c, h, w).to(self.values.dtype)
            if self.method == "fft":
                kernel_spectrum = self._projection()[0]  # (C, C, 2H, W + 1)
                spectrum = torch.fft.rfft2(x, s=(2 * h, 2 * w))
                # sum over the input channel c': C^2 elementwise products per frequency, no d x d matrix
                mixed = (kernel_spectrum.unsqueeze(0) * spectrum.unsqueeze(1)).sum(2)
                out = torch.fft.irfft2(mixed, s=(2 * h, 2 * w))[..., :h, :w]
            else:
                if self._kernel is None:
                    grid = self._projection()[1]  # displacement -k sits at index 2H - k: roll it to the centre
                    self._kernel = grid.roll((h - 1, w - 1), dims=(2, 3))[:, :, : 2 * h - 1, : 2 * w - 1].contiguous()
                # conv2d correlates; K is even in the displacement, so correlation is the convolution
                out = F.conv2d(x, self._kernel, padding=(h - 1, w - 1))
        return out.reshape(g.shape).to(g.dtype)

    def mean_diagonal(self) -> Tensor:
        return self.values.diagonal(dim1=0, dim2=1)[0].mean()

    def covariance_functions(self) -> Tensor:
        return self.values

    def to_dense(self) -> Tensor:
        """The (d, d) matrix that :meth:`matvec` multiplies by (channel-major, row-major positions:
        ``x.flatten(1)``'s order). d^2 floats: for tests and small inputs only."""
        c, h, w = self.image
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        # the displacement p - q on the circular grid: index k for k >= 0, 2H + k for k < 0
        dr, dc = (rows[:, None] - rows[None, :]) % (2 * h), (cols[:, None] - cols[None, :]) % (2 * w)
        dense = self._projection()[1][:, :, dr.to(self.device), dc.to(self.device)]  # (C, C, P, P)
        return dense.permute(0, 2, 1, 3).reshape(c * h * w, c * h * w)

    # ---- estimation --------------------------------------------------------------------------------------
    def batch_statistics(self, xi: Tensor) -> dict[str, Tensor]:
        """Sums over the batch: ``count``, ``first`` (sum of xi) and ``second`` (C, C, R): per channel pair and
        radius, sum over examples and over the ordered position pairs in the bin of xi[c, p] xi[c', q]."""
        xi, count = self._first_and_flat(xi)
        c, h, w = self.image
        with torch.autocast(xi.device.type, enabled=False):
            x = xi.reshape(-1, c, h, w)
            spectrum = torch.fft.rfft2(x, s=(2 * h, 2 * w))
            cross = _cross_spectra(spectrum)
            # corr[c, c', k] = sum_i sum_p xi_i[c, p + k] xi_i[c', p]: zero padding keeps it linear
            corr = torch.fft.irfft2(cross, s=(2 * h, 2 * w)).reshape(c * c, -1)
            second = (corr @ self._binning()).reshape(c, c, -1)
        # symmetrize: the pair (c, c') at d is (c', c) at -d, in the same bin; exact up to rounding, made exact
        second = 0.5 * (second + second.transpose(0, 1))
        return {"count": count, "first": xi.sum(0), "second": second}

    def _cached(self, name: str, build) -> Tensor:
        """``build()`` moved to this Sigma's device once, kept per device: the update and the kernel run every
        step, and a host-to-device copy there would make a CUDA host wait."""
        cache = self.__dict__.setdefault("_device_cache", {})
        key = (name, str(self.device), self.values.dtype)
        if key not in cache:
            value = build()
            cache[key] = value.to(self.device, self.values.dtype if value.is_floating_point() else value.dtype)
        return cache[key]

    def _binning(self) -> Tensor:
        """(2H 2W, R) 0/1 matrix: displacement -> radius bin (the unused displacements map to no bin)."""
        c, h, w = self.image
        radius, bins = _radius_of_displacements(h, w)
        return self._cached("binning", lambda: F.one_hot(radius.flatten(), bins + 1)[:, :bins].double())

    def _moment(self, stats: dict[str, Tensor]) -> Tensor:
        c, h, w = self.image
        pairs = self._cached("pairs", lambda: _pairs_per_bin(h, w).clamp_min(1))
        return stats["second"].to(self.values) / (stats["count"].to(self.values) * pairs)

    # ---- from a dense matrix -------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, matrix: Tensor, shape: tuple[int, ...], **kwargs) -> StationaryCovariance:
        """The stationary covariance closest to ``matrix`` (d, d) in the Frobenius norm: per channel pair and
        radius, the mean of its entries over the position pairs at that rounded distance. Used for a fixed Sigma
        given as a file (e.g. the data set's covariance) and to draw a full matrix's covariance functions."""
        c, h, w = image_shape(tuple(shape))
        p = h * w
        if tuple(matrix.shape) != (c * p, c * p):
            raise ValueError(f"a covariance over inputs {tuple(shape)} is ({c * p}, {c * p}), "
                             f"got {tuple(matrix.shape)}")
        radius = position_radius(h, w).flatten().to(matrix.device)
        bins = _radius_of_displacements(h, w)[1]
        blocks = matrix.reshape(c, p, c, p).permute(0, 2, 1, 3).reshape(c * c, p * p)
        sums = blocks.new_zeros(c * c, bins).index_add_(1, radius, blocks)
        pairs = _pairs_per_bin(h, w).to(sums).clamp_min(1)
        functions = (sums / pairs).reshape(c, c, bins)
        dtype = kwargs.pop("dtype", torch.float32)
        return cls(shape, functions=(0.5 * (functions + functions.transpose(0, 1))).to(dtype), dtype=dtype, **kwargs)
