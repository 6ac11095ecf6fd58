"""Defensive tensorization (Bulat, Kossaifi, Bhattacharya, Panagakis, Tzimiropoulos, Pantic 2021).

Every weight W of a Conv1d, Conv2d or Linear layer is kept as a Tucker tensor: a core G and one factor matrix
per mode, W = G x_0 U_0 x_1 U_1 ... (paper eq. 1). The defense randomizes the *rank*: on every forward, in
training and at inference, each mode n draws a keep-vector lambda_n ~ Bernoulli(theta) over its rank and the
weight is rebuilt from the sketched core (paper eq. 4), so the weight stays dense.

Implementation choices (see docs/methods.md, "Defensive tensorization"):

* Fixed-shape masks. tensorly-torch's ``TuckerDropout`` keeps a variable-length index set (a host sync and
  dynamic shapes) and is off in eval mode. Here each mode's mask has the full rank's length and multiplies
  the factor's columns: ``G x_n diag(lambda) x_n U = G x_n (U diag(lambda))`` (the identity the paper uses
  after eq. 3), so masking costs O(sum of ranks), never touches the core, has no data-dependent indexing
  and compiles.
* Reconstruction (:func:`tucker_to_weight`: the tensor ``tensorly.tucker_to_tensor`` gives, up to float
  rounding). Three products: one for the output-channel mode, one for the input-channel mode and one for all
  spatial modes at once (the Kronecker product of their small factors). The intermediate keeps the layout
  (output-channel axis, input-channel axis, spatial axes), which each product reads and writes as it is, so the
  forward never permutes or copies anything larger than a factor (``tensorly``'s mode products unfold and fold
  with copies) and the weight comes out contiguous; the products run in the order with the fewest multiply-adds
  (fixed per layer). On the CPU, for float32 and bfloat16, the products of a large layer are 1x1 convolutions,
  which run in oneDNN, backward included, without a copy; ``torch.matmul`` (MKL) was half as fast on these shapes
  on the benchmark machine. Elsewhere, and for small layers, they are matmuls (whose batched input-channel
  product copies in its backward).
* Factored channel modes. ``W = W' x_0 U_0`` with ``W' = G x_1 U_1 x_2 ...``, so a convolution with W equals the
  convolution with W' (rank_0 output channels) followed by a 1x1 convolution with U_0; likewise U_1 can be
  applied to the input as a 1x1 convolution (to rank_1 channels) before it. Where that costs fewer multiply-adds
  than rebuilding those modes for the whole kernel (its size times a rank, against the input's or output's
  positions times a factor's size), i.e. for a wide layer on a small batch of small feature maps (ResNet-18's
  last stage on CIFAR) or below full rank (a narrower kernel), ``TuckerConv`` computes its output so (as
  tensorly-torch's factorized convolutions do): the same function and the same mask draw, up to float rounding,
  without building the dense weight. ``weight`` and ``reconstruct`` still give the dense weight;
  ``TuckerConv.factorize = False`` turns this off.
* Small modes stay whole. Like tensorly-torch (``min_dim=3``), modes whose rank is at most ``min_dim`` (the
  3x3 or 1x1 spatial modes of a conv kernel) are not masked: dropping one of three spatial components
  removes a third of the kernel's support.
* Rescaling. Each masked mode divides its mask by theta, so the sketched weight is an unbiased estimate of
  the full weight (E[W~] = W). The rescaling applies in training and at inference alike, so turning the
  randomness off (``randomness_off``: theta = 1, the omniscient attacker's model) gives the expected weight
  that the BatchNorm statistics were collected around, not a weight scaled by theta^-k.
* Rank. ``rank`` is a fraction of each mode's size (1.0 = full rank, exact decomposition), an int (the same
  rank for every non-spatial mode, capped at the mode size) or a per-mode list.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import tensorly as tl
import torch
import torch.nn.functional as F
from tensorly.decomposition import tucker
from torch import Tensor, nn

from .tucker_weight import _contract, _onednn, _steps, contraction_order, reconstruction_macs, tucker_to_weight
from .wrapper import temporarily_set

tl.set_backend("pytorch")  # tensorly-torch does the same on import; our layers only use the torch backend

Rank = float | int | Sequence[int]

_CONVS = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d}
_LAYER_TYPES = ("Conv1d", "Conv2d", "Linear")


def tucker_ranks(shape: Sequence[int], rank: Rank) -> list[int]:
    """Per-mode ranks for a weight of ``shape``: fraction of each mode, an int for the channel modes, or a list.

    A mode's rank never exceeds the rank of its unfolding (the product of the other modes' sizes): a 64 x 3 x 3 x 3
    kernel has at most 27 independent output filters, so a larger factor would only add dead columns.
    """
    total = math.prod(shape)
    return [min(r, total // d) for r, d in zip(_requested_ranks(shape, rank), shape, strict=True)]


def _requested_ranks(shape: Sequence[int], rank: Rank) -> list[int]:
    if isinstance(rank, bool):
        raise TypeError("rank must be a float fraction, an int or a list of ints, got a bool")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"a fractional rank must be in (0, 1], got {rank}")
        return [max(1, math.ceil(rank * d)) for d in shape]
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        # The kernel's spatial modes (index >= 2 of a conv weight) keep their full size.
        return [min(rank, d) if n < 2 else d for n, d in enumerate(shape)]
    ranks = [int(r) for r in rank]
    if len(ranks) != len(shape) or any(not 1 <= r <= d for r, d in zip(ranks, shape, strict=True)):
        raise ValueError(f"rank {ranks} does not fit a weight of shape {list(shape)}: one rank per mode, each "
                         "between 1 and the mode's size")
    return ranks


def _check_theta(theta: float) -> float:
    theta = float(theta)
    if not 0.0 < theta <= 1.0:
        raise ValueError(f"theta is the keep probability of each latent rank component and must be in (0, 1], "
                         f"got {theta} (theta = 1 turns the randomization off)")
    return theta


class TuckerLayer(nn.Module):
    """Base of the Tucker-parametrized layers: core, factors, masks and the reconstructed ``weight``.

    ``weight`` is a property: each access rebuilds the weight with a fresh draw of the masks (when theta < 1),
    so code written for ``nn.Conv2d``/``nn.Linear`` that reads ``layer.weight`` once per forward (the XNOR
    layers, for instance) sees the randomized weight. ``RANDOMNESS``: theta sets the randomness, 1 turns it off
    (``networks/randomness.py``).
    """

    RANDOMNESS = ("theta", 1.0)

    def __init__(self, weight: Tensor, bias: Tensor | None, rank: Rank, theta: float, min_dim: int,
                 decompose: bool, n_iter: int):
        super().__init__()
        self.weight_shape = tuple(weight.shape)
        self.ranks = tucker_ranks(self.weight_shape, rank)
        self.theta = _check_theta(theta)
        self.min_dim = int(min_dim)
        with torch.no_grad():
            if decompose:
                full = self.ranks == tucker_ranks(self.weight_shape, 1.0)
                # At full rank the HOSVD initialization is already exact: skip the HOOI sweeps.
                core, factors = tucker(weight.detach().float(), rank=self.ranks, init="svd",
                                       n_iter_max=1 if full else n_iter)
            else:  # random init with the layer's scale: orthonormal factors, core ~ the weight's own std
                factors = [torch.linalg.qr(torch.randn(d, r))[0] for d, r in zip(self.weight_shape, self.ranks,
                                                                                   strict=True)]
                core = torch.randn(self.ranks) * weight.detach().float().std()
        self.core = nn.Parameter(core.to(weight.dtype).contiguous())
        self.factors = nn.ParameterList([nn.Parameter(f.to(weight.dtype).contiguous()) for f in factors])
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.masked_modes = [n for n, r in enumerate(self.ranks) if r > self.min_dim]
        self.contraction_order = contraction_order(self.weight_shape, self.ranks)

    def draw_masks(self) -> list[Tensor]:
        """One keep-vector per masked mode, of that mode's full rank, entries 0 or 1/theta.

        A single fixed-shape Bernoulli draw for all masked modes, split per mode: the shapes never depend on
        the draw, so there is no host sync and the step compiles. Kept components are scaled by 1/theta so
        that E[weight] is the full weight (see the module docstring).
        """
        sizes = [self.ranks[n] for n in self.masked_modes]
        keep = torch.empty(sum(sizes), device=self.core.device, dtype=self.core.dtype).bernoulli_(self.theta)
        return list(keep.div_(self.theta).split(sizes))

    def masked_factors(self, masks: list[Tensor] | None = None) -> list[Tensor]:
        """The factors, each masked factor's columns scaled by its mask (all of them as they are without masks)."""
        factors = list(self.factors)
        for n, mask in zip(self.masked_modes, masks or [], strict=False):
            factors[n] = factors[n] * mask
        return factors

    def reconstruct(self, masks: list[Tensor] | None = None) -> Tensor:
        """The dense weight from the core and the factors, each masked factor's columns scaled by its mask."""
        return tucker_to_weight(self.core, self.masked_factors(masks), self.contraction_order)

    @property
    def weight(self) -> Tensor:
        """The dense weight: a fresh random draw when theta < 1, the full weight at theta = 1.

        ``TuckerConv``'s forward convolves with it, or computes the same convolution with factored channel modes.
        """
        return self.reconstruct(self.draw_masks() if self.theta < 1.0 else None)

    def extra_repr(self) -> str:
        return f"shape={list(self.weight_shape)}, ranks={self.ranks}, theta={self.theta}"


class TuckerConv(TuckerLayer):
    """A Conv1d or Conv2d whose kernel is a randomized Tucker tensor; built from a trained or fresh conv.

    The forward convolves with ``weight`` (one fresh mask draw), or, where it costs fewer multiply-adds, leaves one or
    both channel modes out of the kernel and applies their masked factors as 1x1 convolutions before (input
    channels) and after (output channels) it: the same function and the same draw (see the module docstring,
    "Factored channel modes"). :meth:`factored_modes` says which for an input.
    """

    factorize = True  # False: always convolve with the dense weight

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, rank: Rank = 1.0, theta: float = 1.0, min_dim: int = 3,
                 decompose: bool = True, n_iter: int = 10):
        if conv.padding_mode != "zeros":
            raise ValueError(f"TuckerConv supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        super().__init__(conv.weight, conv.bias, rank, theta, min_dim, decompose, n_iter)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(conv, name))
        self.dim = conv.weight.dim() - 2
        self._conv = F.conv1d if self.dim == 1 else F.conv2d
        # For (input mode factored, output mode factored): the kernel's products in their order, its shape and the
        # products' multiply-adds.
        self._kernels = {}
        for factor_in, factor_out in itertools.product((False, True), repeat=2):
            steps = _steps(self.weight_shape, skip=[step for step, skip in ((1, factor_in), (0, factor_out)) if skip])
            shape = (self.ranks[0] if factor_out else self.weight_shape[0],
                     self.ranks[1] if factor_in else self.weight_shape[1], *self.weight_shape[2:])
            self._kernels[factor_in, factor_out] = (contraction_order(self.weight_shape, self.ranks, steps), shape,
                                                    reconstruction_macs(self.weight_shape, self.ranks, steps))

    def _positions(self, x: Tensor) -> tuple[int, int]:
        """Batch size times the spatial size of the input and of the output, for ``x`` batched or not."""
        batch = x.shape[0] if x.dim() == self.dim + 2 else 1
        inputs = outputs = batch
        for n in range(self.dim):
            size = x.shape[x.dim() - self.dim + n]
            inputs *= size
            if self.padding == "same":
                outputs *= size
                continue
            padding = 0 if self.padding == "valid" else self.padding[n]
            reach = self.dilation[n] * (self.kernel_size[n] - 1) + 1
            outputs *= max(0, (size + 2 * padding - reach) // self.stride[n] + 1)
        return inputs, outputs

    def factored_modes(self, x: Tensor) -> tuple[bool, bool]:
        """(input-channel mode, output-channel mode): which the forward on ``x`` applies as 1x1 convolutions.

        The choice with the fewest multiply-adds: rebuilding the kernel's remaining modes, the convolution with it
        and the 1x1 convolutions (over the input's and the output's positions). Neither for grouped convolutions.
        """
        if not self.factorize or self.groups != 1:
            return False, False
        q_in, q_out = self._positions(x)
        (f, c), (a, b) = self.weight_shape[:2], self.ranks[:2]
        best = None
        for (factor_in, factor_out), (_, shape, macs) in self._kernels.items():
            # int(): under torch.compile's dynamic shapes q_in is a symbol, and a bool times a symbol fails.
            macs += q_out * math.prod(shape) + int(factor_in) * q_in * c * b + int(factor_out) * q_out * f * a
            if best is None or macs < best[0]:
                best = macs, (factor_in, factor_out)
        return best[1]

    def forward(self, x: Tensor) -> Tensor:
        factor_in, factor_out = self.factored_modes(x)
        if not (factor_in or factor_out):
            return self._conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        factors = self.masked_factors(self.draw_masks() if self.theta < 1.0 else None)
        order, shape, macs = self._kernels[factor_in, factor_out]
        kernel = _contract(self.core, factors, order, _onednn(self.core, macs)).reshape(shape)
        pointwise = [1] * self.dim
        if factor_in:  # U_1^T x: the input in the rank_1 channels of the core
            u = factors[1]
            x = self._conv(x, u.T.reshape(u.shape[1], u.shape[0], *pointwise))
        y = self._conv(x, kernel, None if factor_out else self.bias, self.stride, self.padding, self.dilation)
        if factor_out:  # U_0 y: back from rank_0 to the output channels
            y = self._conv(y, factors[0].reshape(*factors[0].shape, *pointwise), self.bias)
        return y


class TuckerLinear(TuckerLayer):
    """A Linear layer whose (out x in) weight is a randomized Tucker (here: two-factor) tensor."""

    def __init__(self, linear: nn.Linear, rank: Rank = 1.0, theta: float = 1.0, min_dim: int = 3,
                 decompose: bool = True, n_iter: int = 10):
        super().__init__(linear.weight, linear.bias, rank, theta, min_dim, decompose, n_iter)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def tucker_layers(module: nn.Module) -> Iterator[TuckerLayer]:
    return (m for m in module.modules() if isinstance(m, TuckerLayer))


@contextmanager
def keep_probability(module: nn.Module, theta: float) -> Iterator[nn.Module]:
    """Temporarily set every Tucker layer's keep probability to ``theta`` (restored on exit)."""
    with temporarily_set(tucker_layers(module), "theta", _check_theta(theta)):
        yield module


def is_tensorized(module: nn.Module) -> bool:
    return next(tucker_layers(module), None) is not None
