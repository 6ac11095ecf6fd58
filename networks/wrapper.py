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


def check_latent(network: nn.Module) -> None:
    """A clear error when a wrapper is asked for z but wraps a module without the latent interface."""
    if not hasattr(network, "forward_with_latent"):
        raise TypeError(f"{type(network).__name__} has no latent layer (forward_with_latent); wrap a network of "
                        "this package (networks.*) to get (z, logits)")


class TransformedNetwork(nn.Module):
    """Holds a transformed ``network`` and keeps its interface: ``forward``, ``forward_features``, ``head``,
    ``feature_dim`` and the latent interface of ``advtrain.networks.latent`` (``forward_with_latent``, ``to_latent``,
    ``logits_from_latent``, ``latent_layer``, ``latent_dim``), so defenses that use z (ADR) work unchanged.

    ``forward_with_latent`` calls this wrapper's ``__call__``, which calls the wrapped network's: one forward,
    compiled when the wrapper is. The latent layer is the wrapped network's option."""

    network: nn.Module

    def forward(self, x: Tensor, return_latent: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        # The plain call stays plain, so any nn.Module may be wrapped when nobody asks for z.
        if not return_latent:
            return self.network(x)
        check_latent(self.network)
        return self.network(x, return_latent=True)

    def forward_with_latent(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self(x, return_latent=True)

    def to_latent(self, x: Tensor) -> Tensor:
        return self.network.to_latent(x)

    def logits_from_latent(self, z: Tensor) -> Tensor:
        return self.network.logits_from_latent(z)

    @property
    def latent_layer(self) -> str:
        return self.network.latent_layer

    @property
    def latent_dim(self) -> int:
        return self.network.latent_dim

    def forward_features(self, x: Tensor) -> Tensor:
        return self.network.forward_features(x)

    @property
    def head(self) -> nn.Module:
        return self.network.head

    @property
    def feature_dim(self) -> int:
        return self.network.feature_dim
