"""The latent-layer interface every network of this package shares (ADR's generator / classifier split).

ADR (Bui et al. 2020) splits a network into a generator g (input -> latent z) and a classifier h
(z -> logits). A network names the layer where z is taken with its ``latent_layer`` constructor option (the
paper's choice by default) and exposes:

- ``forward(x, return_latent=False)``: the logits, or ``(z, logits)`` from the same single forward pass;
- ``forward_with_latent(x) -> (z, logits)``: ``self(x, return_latent=True)``. It goes through ``__call__`` on
  purpose: ``nn.Module.compile()`` compiles ``__call__`` only, so a compiled network runs this compiled too,
  and hooks see it like any forward;
- ``to_latent(x) -> z`` (g alone) and ``logits_from_latent(z) -> logits`` (h alone: the rest of the network
  from the latent layer, for loss surfaces with respect to z), with
  ``logits_from_latent(forward_with_latent(x)[0]) == forward_with_latent(x)[1]``;
- ``latent_layer`` (the chosen name) and ``latent_dim`` (z is flattened to ``(B, latent_dim)``).

Layer names are uniform across networks (our choice): ``"conv"`` is the flattened output of the last conv
block before the fully connected layers, ``"fc1"`` the first hidden FC layer after its activation, and
``"penultimate"`` the representation ``head`` reads (``forward_features``). Each network lists the ones it
has in ``LATENT_LAYERS``. The method is not called ``generator``: that name is the ``generator=`` argument of
every attack.
"""

from __future__ import annotations

from torch import Tensor, nn


def check_latent_layer(owner: str, latent_layer: str, allowed: tuple[str, ...]) -> str:
    """Return ``latent_layer`` if it is one of ``allowed``; a one-line ValueError otherwise."""
    if latent_layer not in allowed:
        raise ValueError(f"{owner} latent_layer must be one of {list(allowed)}, got {latent_layer!r}")
    return latent_layer


class LatentNetwork(nn.Module):
    """Base class: ``forward`` is ``logits_from_latent(to_latent(x))``, so (z, logits) cost one forward.

    Subclasses set ``LATENT_LAYERS``, call :meth:`_set_latent_layer` in ``__init__`` and implement
    ``to_latent`` and ``logits_from_latent`` (branching on the configured name only, never on tensor values).
    """

    LATENT_LAYERS: tuple[str, ...] = ("penultimate",)
    latent_layer: str
    latent_dim: int

    def _set_latent_layer(self, latent_layer: str, dims: dict[str, int]) -> None:
        self.latent_layer = check_latent_layer(type(self).__name__, latent_layer, self.LATENT_LAYERS)
        self.latent_dim = int(dims[latent_layer])

    def to_latent(self, x: Tensor) -> Tensor:
        """z = g(x), flattened to (B, latent_dim)."""
        raise NotImplementedError

    def logits_from_latent(self, z: Tensor) -> Tensor:
        """h(z): the rest of the network from the latent layer."""
        raise NotImplementedError

    def forward(self, x: Tensor, return_latent: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        z = self.to_latent(x)
        logits = self.logits_from_latent(z)
        return (z, logits) if return_latent else logits

    def forward_with_latent(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z, logits) in one forward pass, through ``__call__`` (compiled when the network is)."""
        return self(x, return_latent=True)
