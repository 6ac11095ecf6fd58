"""Defensive tensorization of a whole network: :func:`tensorize` replaces its layers by Tucker layers
(``advtrain.networks.tucker``), :class:`Tensorized` does it from a config, starting from a plain model's checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .tucker import _CONVS, _LAYER_TYPES, Rank, TuckerConv, TuckerLinear, _check_theta
from .wrapper import TransformedNetwork


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
    """Config-friendly wrapper: ``advtrain.networks.Tensorized(network=..., rank=..., theta=..., checkpoint=...)``.

    Loads ``checkpoint`` (a plain model's) into ``network`` first when given, then tensorizes it by Tucker
    decomposition of those weights (the paper starts every theta < 1 model from a theta = 1 model). Keeps the
    wrapped network's ``forward_features`` / ``head`` / ``feature_dim`` and latent (``forward_with_latent``)
    interface.
    """

    def __init__(self, network: nn.Module, rank: float | int | list[int] = 1.0, theta: float = 1.0,
                 layers: list[str] | None = None, exclude: list[str] | None = None, min_dim: int = 3,
                 checkpoint: str | None = None, n_iter: int = 10):
        super().__init__()
        if checkpoint:
            load_plain_weights(network, checkpoint)
        self.network = tensorize(network, rank=rank, theta=theta, layers=layers or _LAYER_TYPES,
                                 exclude=exclude or (), min_dim=min_dim, n_iter=n_iter)
