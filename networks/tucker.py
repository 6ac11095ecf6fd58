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
  and compiles. The reconstruction is ``tensorly.tucker_to_tensor``.
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

    def draw_masks(self) -> list[Tensor]:
        """One keep-vector per masked mode, of that mode's full rank, entries 0 or 1/theta.

        A single fixed-shape Bernoulli draw for all masked modes, split per mode: the shapes never depend on
        the draw, so there is no host sync and the step compiles. Kept components are scaled by 1/theta so
        that E[weight] is the full weight (see the module docstring).
        """
        sizes = [self.ranks[n] for n in self.masked_modes]
        keep = torch.empty(sum(sizes), device=self.core.device, dtype=self.core.dtype).bernoulli_(self.theta)
        return list(keep.div_(self.theta).split(sizes))

    def reconstruct(self, masks: list[Tensor] | None = None) -> Tensor:
        """The dense weight from the core and the factors, each masked factor's columns scaled by its mask."""
        factors = list(self.factors)
        for n, mask in zip(self.masked_modes, masks or [], strict=False):
            factors[n] = factors[n] * mask
        return tl.tucker_to_tensor((self.core, factors))

    @property
    def weight(self) -> Tensor:
        """The weight this forward uses: a fresh random draw when theta < 1, the full weight at theta = 1."""
        return self.reconstruct(self.draw_masks() if self.theta < 1.0 else None)

    def extra_repr(self) -> str:
        return f"shape={list(self.weight_shape)}, ranks={self.ranks}, theta={self.theta}"


class TuckerConv(TuckerLayer):
    """A Conv1d or Conv2d whose kernel is a randomized Tucker tensor; built from a trained or fresh conv."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, rank: Rank = 1.0, theta: float = 1.0, min_dim: int = 3,
                 decompose: bool = True, n_iter: int = 10):
        if conv.padding_mode != "zeros":
            raise ValueError(f"TuckerConv supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        super().__init__(conv.weight, conv.bias, rank, theta, min_dim, decompose, n_iter)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(conv, name))
        self.dim = conv.weight.dim() - 2
        self._conv = F.conv1d if self.dim == 1 else F.conv2d

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


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
