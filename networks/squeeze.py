"""Feature squeezing (Xu, Evans & Qi 2018, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural
Networks") as an input-transformation defense: the baseline of defensive tensorization, Table 2.

The input x in [0, 1] is squeezed, then classified: bit-depth reduction to b bits, round(x (2^b - 1)) / (2^b - 1),
then a k x k median filter per channel that is scipy.ndimage.median_filter(channel, size=k) exactly (mode
'reflect', origin 0): the window spans offsets -(k // 2) .. (k - 1) // 2 (for k = 2 the pixel and its
upper/left neighbours), the border is mirrored with the edge pixel repeated (d c b a | a b c d), and the
result is the element of rank k * k // 2 in sorted order (the upper median when k * k is even).

Rounding has zero derivative, so a white-box attack through the squeezer sees no gradient (gradient masking).
The module declares the attack surrogates of ``advtrain.attacks.surrogates``: ``exact`` (the real forward and backward),
``identity`` (BPDA, Athalye et al. 2018: squeezed forward, identity backward) and ``oblivious`` (an attacker who
does not know the squeezer: forward without it; the evaluation crafts with it and evaluates with ``exact``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from advtrain.attacks.surrogates import register_surrogates

from .tensorize import load_plain_weights
from .wrapper import TransformedNetwork, check_latent


def reduce_bit_depth(x: Tensor, bits: int) -> Tensor:
    """round(x (2^bits - 1)) / (2^bits - 1), in at least float32 (bf16 cannot hold x * 31 to the half-level)."""
    levels = 2**bits - 1
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return (torch.round(wide * levels) / levels).to(x.dtype)


def _symmetric_index(n: int, before: int, after: int, device: torch.device) -> Tensor:
    """Indices of a length-n axis padded by scipy's 'reflect' (d c b a | a b c d | d c b a), any pad width."""
    i = torch.arange(-before, n + after, device=device) % (2 * n)  # the mirrored pattern has period 2n
    return torch.where(i < n, i, 2 * n - 1 - i)


def median_filter(x: Tensor, size: int) -> Tensor:
    """Per-channel size x size median filter of (..., H, W) images, equal to scipy.ndimage.median_filter
    (size=size, mode='reflect', origin=0) applied to each (H, W) slice. Fixed shapes, no Python loop over data."""
    if size == 1:
        return x
    h, w = x.shape[-2:]
    before, after = size // 2, (size - 1) // 2  # scipy centres an even window one step up/left of the pixel
    padded = x.index_select(-2, _symmetric_index(h, before, after, x.device))
    padded = padded.index_select(-1, _symmetric_index(w, before, after, x.device))
    windows = padded.unfold(-2, size, 1).unfold(-2, size, 1).flatten(-2)  # (..., H, W, size * size)
    # sort rather than kthvalue: sort has CPU and CUDA kernels for every float dtype, bf16 included.
    return windows.sort(dim=-1).values[..., size * size // 2]


@register_surrogates
class FeatureSqueezing(TransformedNetwork):
    """``network`` behind a feature squeezer: ``FeatureSqueezing(network=..., bits=5, median_size=2)``.

    forward(x) = network(median_filter(reduce_bit_depth(x, bits), median_size)) for x in [0, 1] of shape
    (B, C, H, W). ``bits=None`` skips the bit-depth reduction, ``median_size=1`` the median filter.
    ``checkpoint`` loads a plain (unsqueezed) network's weights into ``network`` first, so a normally trained
    model is squeezed at test time, as Xu et al. do. ``surrogate`` is the attack-time behaviour (see the module
    docstring); evaluations switch it with ``advtrain.attacks.surrogates.use_surrogate`` / ``use_bpda``. Keeps the
    wrapped network's ``forward_features`` / ``head`` / ``feature_dim`` and latent interface, squeezing the input
    in every forward (``logits_from_latent`` starts after the squeezer, so it is the wrapped network's).
    """

    SURROGATES = ("exact", "identity", "oblivious")
    BPDA = "identity"
    SURROGATE_LABEL = "squeeze={}"

    def __init__(self, network: nn.Module, bits: int | None = 5, median_size: int = 2,
                 checkpoint: str | None = None, surrogate: str = "exact"):
        super().__init__()
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16):
            raise ValueError(f"FeatureSqueezing bits must be an integer in [1, 16], or None to skip the bit-depth "
                             f"reduction; got {bits!r}")
        if isinstance(median_size, bool) or not isinstance(median_size, int) or median_size < 1:
            raise ValueError(f"FeatureSqueezing median_size must be a positive integer (1 skips the median "
                             f"filter); got {median_size!r}")
        self.bits, self.median_size = bits, median_size
        self.surrogate = self._check(surrogate)
        if checkpoint:
            if not Path(checkpoint).is_file():  # load_plain_weights' own message is about tensorized models
                raise FileNotFoundError(f"FeatureSqueezing checkpoint {checkpoint!r} does not exist: train the "
                                        "plain (unsqueezed) network first and point checkpoint at its .ckpt")
            load_plain_weights(network, checkpoint)
        self.network = network

    @classmethod
    def _check(cls, surrogate: str) -> str:
        if surrogate not in cls.SURROGATES:
            raise ValueError(f"unknown FeatureSqueezing surrogate {surrogate!r}; choose one of: "
                             f"{', '.join(cls.SURROGATES)}")
        return surrogate

    def squeeze(self, x: Tensor) -> Tensor:
        """The squeezer alone, with autograd's own (almost everywhere zero) backward."""
        if x.dim() != 4:
            raise ValueError(f"FeatureSqueezing takes (B, C, H, W) images, got shape {list(x.shape)}")
        if self.bits is not None:
            x = reduce_bit_depth(x, self.bits)
        return median_filter(x, self.median_size)

    def _input(self, x: Tensor) -> Tensor:
        """What the wrapped network sees under the current surrogate."""
        surrogate = self._check(self.surrogate)  # use_surrogate sets the attribute directly
        if surrogate == "oblivious":
            return x
        if surrogate == "identity":  # BPDA: forward squeezes, backward passes the gradient straight to x.
            # = x + (squeeze(x) - x).detach(), written so that the forward value is squeeze(x) to the last bit.
            return self.squeeze(x).detach() + (x - x.detach())
        return self.squeeze(x)

    def forward(self, x: Tensor, return_latent: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x = self._input(x)
        if not return_latent:
            return self.network(x)
        check_latent(self.network)
        return self.network(x, return_latent=True)

    def to_latent(self, x: Tensor) -> Tensor:
        return self.network.to_latent(self._input(x))

    # logits_from_latent is the wrapped network's own (inherited): the squeezer acts on the input only.

    def forward_features(self, x: Tensor) -> Tensor:
        return self.network.forward_features(self._input(x))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, median_size={self.median_size}, surrogate={self.surrogate!r}"
