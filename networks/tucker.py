"""Defensive tensorization (Bulat, Kossaifi, Bhattacharya, Panagakis, Tzimiropoulos, Pantic 2021).

Every weight W of a Conv1d, Conv2d or Linear layer is kept as a Tucker tensor: a core G and one factor matrix
per mode, W = G x_0 U_0 x_1 U_1 ... (paper eq. 1). The defense randomizes the *rank*: on every forward, in
training and at inference, each mode n draws a keep-vector lambda_n ~ Bernoulli(theta) over its rank and the
weight is rebuilt from the sketched core (paper eq. 4), so the weight stays dense.

Implementation choices (see METHODS.md, "Defensive tensorization"):

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
from pathlib import Path

import tensorly as tl
import torch
import torch.nn.functional as F
from tensorly.decomposition import tucker
from torch import Tensor, nn

from .wrapper import TransformedNetwork, temporarily_set

tl.set_backend("pytorch")  # tensorly-torch does the same on import; our layers only use the torch backend

# CPU products of the reconstruction run as 1x1 convolutions in oneDNN where torch has it (see the module docstring)
_ONEDNN = torch.backends.mkldnn.is_available()

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
    layers, for instance) sees the randomized weight.
    """

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
            macs += q_out * math.prod(shape) + factor_in * q_in * c * b + factor_out * q_out * f * a
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


def tensorize(network: nn.Module, rank: Rank = 1.0, theta: float = 1.0, layers: Sequence[str] = _LAYER_TYPES,
              exclude: Sequence[str] = (), min_dim: int = 3, decompose: bool = True, n_iter: int = 10) -> nn.Module:
    """Replace, in place, every layer of the types in ``layers`` by its Tucker-parametrized version.

    ``decompose=True`` initializes each core and factors by a Tucker decomposition (HOSVD then ``n_iter`` HOOI
    sweeps, tensorly) of the layer's current weight, so a trained network stays what it was (exactly at full
    rank). ``exclude`` lists qualified module names (as in ``named_modules``) to leave plain. Returns the network.
    """
    unknown = set(layers) - set(_LAYER_TYPES)
    if unknown:
        raise ValueError(f"layers may contain {list(_LAYER_TYPES)}, got {sorted(unknown)}")
    _check_theta(theta)
    names = {name for name, _ in network.named_modules()}
    missing = [e for e in exclude if e not in names]
    if missing:
        raise ValueError(f"exclude names {missing} are not modules of {type(network).__name__}; "
                         f"choose among {sorted(n for n in names if n)[:20]}...")
    kinds = tuple(_CONVS[k] for k in layers if k in _CONVS)
    kwargs = dict(rank=rank, theta=theta, min_dim=min_dim, decompose=decompose, n_iter=n_iter)
    replaced = 0
    for parent_name, parent in list(network.named_modules()):
        for child_name, child in list(parent.named_children()):
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            if qualified in exclude:
                continue
            if kinds and isinstance(child, kinds):
                setattr(parent, child_name, TuckerConv(child, **kwargs))
                replaced += 1
            elif "Linear" in layers and type(child) is nn.Linear:
                setattr(parent, child_name, TuckerLinear(child, **kwargs))
                replaced += 1
    if replaced == 0:
        raise ValueError(f"tensorize found no {list(layers)} layer to replace in {type(network).__name__}")
    return network


@contextmanager
def keep_probability(module: nn.Module, theta: float) -> Iterator[nn.Module]:
    """Temporarily set every Tucker layer's keep probability to ``theta`` (restored on exit)."""
    with temporarily_set(tucker_layers(module), "theta", _check_theta(theta)):
        yield module


def randomness_off(module: nn.Module):
    """Context manager: the deterministic network (theta = 1), for the omniscient attacker and debugging."""
    return keep_probability(module, 1.0)


def is_tensorized(module: nn.Module) -> bool:
    return next(tucker_layers(module), None) is not None


def load_plain_weights(network: nn.Module, checkpoint: str | Path, prefix: str = "network.") -> None:
    """Load a plain (untensorized) network's weights from a Lightning checkpoint or a state_dict file.

    Lightning checkpoints of our defenses store the network under ``network.``; a bare state_dict is used as is.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: train the plain (theta = 1) model first "
                                "(configs/cifar10/tensorized_theta1.yaml for tensorized_theta0.9.yaml) or point "
                                "model.init_args.network.init_args.checkpoint at its .ckpt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not match {type(network).__name__}: missing keys "
                         f"{missing[:5]}, unexpected keys {unexpected[:5]}. It must come from the same "
                         "architecture before tensorization.")


class Tensorized(TransformedNetwork):
    """Config-friendly wrapper: ``networks.Tensorized(network=..., rank=..., theta=..., checkpoint=...)``.

    Loads ``checkpoint`` (a plain model's) into ``network`` first when given, then tensorizes it by Tucker
    decomposition of those weights (the paper starts every theta < 1 model from a theta = 1 model). Keeps the
    wrapped network's ``forward_features`` / ``head`` / ``feature_dim`` interface.
    """

    def __init__(self, network: nn.Module, rank: float | int | list[int] = 1.0, theta: float = 1.0,
                 layers: list[str] | None = None, exclude: list[str] | None = None, min_dim: int = 3,
                 checkpoint: str | None = None, n_iter: int = 10):
        super().__init__()
        if checkpoint:
            load_plain_weights(network, checkpoint)
        self.network = tensorize(network, rank=rank, theta=theta, layers=layers or _LAYER_TYPES,
                                 exclude=exclude or (), min_dim=min_dim, n_iter=n_iter)
