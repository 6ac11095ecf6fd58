"""Base of the config-friendly network transforms (``Tensorized``, ``Binarized``)."""

from __future__ import annotations

from torch import Tensor, nn


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
