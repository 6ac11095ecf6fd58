"""The dense weight of a Tucker tensor, fast: the products of :func:`tucker_to_weight` in the cheapest order, with no
copy of anything larger than a factor, as oneDNN 1x1 convolutions on the CPU (see ``advtrain.networks.tucker``'s
docstring).

It computes what ``tensorly.tucker_to_tensor`` computes (up to float rounding; tests/networks/test_tucker.py checks it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# CPU products of the reconstruction run as 1x1 convolutions in oneDNN where torch has it (see the module docstring)
_ONEDNN = torch.backends.mkldnn.is_available()

def _steps(shape: Sequence[int], skip: Sequence[int] = ()) -> tuple[int, ...]:
    """The reconstruction's products for a weight of ``shape``, 0 (output channels), 1 (input channels) and
    2 (spatial), less those in ``skip``."""
    return tuple(step for step in ((0, 1, 2) if len(shape) > 2 else (0, 1)) if step not in skip)


def _order_costs(shape: Sequence[int], ranks: Sequence[int],
                 steps: Sequence[int] | None = None) -> Iterator[tuple[int, tuple[int, ...]]]:
    """(multiply-adds, order) of every order of the products in ``steps`` (default: all; see contraction_order)."""
    sizes = [shape[0], shape[1], math.prod(shape[2:])]
    inner = [ranks[0], ranks[1], math.prod(ranks[2:])]
    for order in itertools.permutations(_steps(shape) if steps is None else steps):
        current, cost = list(inner), 0
        for step in order:
            cost += math.prod(current) * sizes[step]  # each entry of the step's output sums inner[step] products
            current[step] = sizes[step]
        yield cost, order


def contraction_order(shape: Sequence[int], ranks: Sequence[int],
                      steps: Sequence[int] | None = None) -> tuple[int, ...]:
    """The order of the reconstruction's products with the fewest multiply-adds.

    Step 0 multiplies the output-channel mode by its factor, step 1 the input-channel mode, step 2 all spatial
    modes at once (a weight with no spatial mode has steps 0 and 1 only). At full rank every order costs the same
    (the first, 0-1-2, is taken); below it, the modes whose rank is smallest relative to their size go last.
    ``steps`` restricts the products to a subset (a factored channel mode is left out).
    """
    return min(_order_costs(shape, ranks, steps), key=lambda cost_order: cost_order[0])[1]


def reconstruction_macs(shape: Sequence[int], ranks: Sequence[int], steps: Sequence[int] | None = None) -> int:
    """Multiply-adds of one reconstruction in the best order (its backward costs about twice as many)."""
    return min(cost for cost, _ in _order_costs(shape, ranks, steps))


# Below this many multiply-adds a reconstruction is a few small GEMMs whose per-call overhead dominates, and
# torch.matmul beats the oneDNN 1x1 convolutions on the CPU as well (measured on ResNet-18's layers).
_ONEDNN_MIN_MACS = 1 << 23


def _onednn(core: Tensor, macs: int) -> bool:
    return (_ONEDNN and core.device.type == "cpu" and core.dtype in (torch.float32, torch.bfloat16)
            and macs >= _ONEDNN_MIN_MACS)


# The three products. x always has the layout (output-channel axis, input-channel axis, spatial axes flattened),
# each axis at its rank or at its size depending on which products are done, and every product writes that layout.
# On the oneDNN path each is a 1x1 convolution whose memory format needs no reorder or copy of x.

def _output_channel_product(x: Tensor, u: Tensor, onednn: bool) -> Tensor:
    """(r0, a, s) -> (d0, a, s): u @ x over the first axis, one GEMM on x's memory as it is."""
    r, a, s = x.shape
    if onednn:  # a 1x1 conv over one image of a * s pixels with r channels
        return F.conv2d(x.reshape(1, r, 1, a * s), u.reshape(u.shape[0], r, 1, 1)).reshape(u.shape[0], a, s)
    return (u @ x.reshape(r, a * s)).reshape(u.shape[0], a, s)


def _input_channel_product(x: Tensor, u: Tensor, onednn: bool) -> Tensor:
    """(a, r1, s) -> (a, d1, s): u @ x[i] for every i of the first axis (a batch of GEMMs; one GEMM when s = 1)."""
    a, r, s = x.shape
    if s == 1 and not onednn:
        return (x.reshape(a, r) @ u.T).reshape(a, u.shape[0], 1)
    if not onednn:
        return torch.matmul(u, x)
    w = u.reshape(u.shape[0], r, 1, 1)
    if s == 1:  # x @ u.T: a channels-last 1x1 conv over a pixels
        return F.conv2d(x.reshape(1, a, 1, r).permute(0, 3, 1, 2), w).permute(0, 2, 3, 1).reshape(a, u.shape[0], 1)
    return F.conv2d(x.reshape(a, r, s, 1), w).reshape(a, u.shape[0], s)  # a 1x1 conv over a images of s pixels


def _spatial_product(x: Tensor, k: Tensor, onednn: bool) -> Tensor:
    """(a, b, p) -> (a, b, s): x @ k.T over the last axis, k the (s, p) Kronecker product of the spatial factors."""
    a, b, p = x.shape
    if onednn:  # a channels-last 1x1 conv, p channels in and s out, over a * b pixels
        y = F.conv2d(x.reshape(a, b, 1, p).permute(0, 3, 1, 2), k.reshape(k.shape[0], p, 1, 1))
        return y.permute(0, 2, 3, 1).reshape(a, b, k.shape[0])
    return x @ k.T


def _contract(core: Tensor, factors: Sequence[Tensor], order: Sequence[int], onednn: bool) -> Tensor:
    """The products of ``order`` applied to the core, as a (axis 0, axis 1, spatial axes flattened) tensor."""
    ranks = core.shape
    if 2 in order and 1 in order and all(f.shape == (1, 1) for f in factors[2:]):
        # 1 x 1 kernel: the spatial factors are 1 x 1, a scale that folds into the input-channel factor
        scale = factors[2]
        for factor in factors[3:]:
            scale = scale * factor
        factors = [factors[0], factors[1] * scale]
        order = [step for step in order if step != 2]
    x = core.reshape(ranks[0], ranks[1], -1)
    for step in order:
        if step == 0:
            x = _output_channel_product(x, factors[0], onednn)
        elif step == 1:
            x = _input_channel_product(x, factors[1], onednn)
        else:
            kron = factors[2]
            for factor in factors[3:]:
                kron = torch.kron(kron, factor)
            x = _spatial_product(x, kron, onednn)
    return x


def tucker_to_weight(core: Tensor, factors: Sequence[Tensor], order: Sequence[int] | None = None,
                     onednn: bool | None = None) -> Tensor:
    """The dense weight ``core x_0 factors[0] x_1 factors[1] ...``, the tensor ``tensorly.tucker_to_tensor`` gives.

    For a 2-D (linear), 3-D (conv1d) or 4-D (conv2d) core. ``order`` is the order of the products (default: the
    cheapest, :func:`contraction_order`); ``onednn`` runs them as oneDNN 1x1 convolutions (default: on the CPU, for
    float32 and bfloat16, when the reconstruction is large enough to gain from it). The forward permutes or copies
    nothing larger than a factor, and the result is contiguous. See the module docstring.
    """
    shape = tuple(f.shape[0] for f in factors)
    ranks = tuple(core.shape)
    if order is None:
        order = contraction_order(shape, ranks)
    if sorted(order) != list(_steps(shape)):
        raise ValueError(f"order must be a permutation of {_steps(shape)} for a {len(shape)}-D weight, got {order}")
    if onednn is None:
        onednn = _onednn(core, reconstruction_macs(shape, ranks))
    return _contract(core, factors, order, onednn).reshape(shape)
