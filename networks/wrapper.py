"""Shared pieces of the network transforms (``Tensorized``, ``Binarized``): the config-friendly wrapper, and
the temporary per-layer switch behind ``keep_probability`` and ``sign_surrogate``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn


@contextmanager
def temporarily_set(layers: Iterable[nn.Module], attribute: str, value) -> Iterator[None]:
    """Set ``attribute`` to ``value`` on every layer for the body; each layer gets its own old value back."""
    layers = list(layers)
    saved = [getattr(layer, attribute) for layer in layers]
    for layer in layers:
        setattr(layer, attribute, value)
    try:
        yield
    finally:
        for layer, old in zip(layers, saved, strict=True):
            setattr(layer, attribute, old)


class TransformedNetwork(nn.Module):
    """Holds a transformed ``network`` and keeps its interface: ``forward``, ``forward_features``, ``head`` and
    ``feature_dim`` (see the package docstring), so defenses that use features (ADR) work unchanged."""

    network: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.network.forward_features(x)

    @property
    def head(self) -> nn.Module:
        return self.network.head

    @property
    def feature_dim(self) -> int:
        return self.network.feature_dim
