"""Per-channel input normalization as the first layer of a network.

Networks take inputs in the dataset's natural range ([0, 1] images) and normalize inside, so every attack
budget (eps, step, clamp) is expressed in that natural space and "8/255" means what the papers mean.
"""

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the identity when ``mean`` and ``std`` are both None.

    mean and std are buffers of shape (1, C, 1, 1) so they broadcast over (B, C, H, W) in any memory format
    (channels_last included) and follow ``.to(device/dtype)``. They are non-persistent: the normalization is
    part of the architecture's configuration, not a learned state, so checkpoints stay independent of it.
    """

    def __init__(self, mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError(f"Normalize needs both mean and std or neither; got mean={mean}, std={std}")
        self.identity = mean is None
        if mean is None or std is None:
            return
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != len(std):
            raise ValueError(f"Normalize: mean has {len(mean)} entries but std has {len(std)}: {mean} vs {std}")
        if len(mean) == 0:
            raise ValueError("Normalize: mean and std must not be empty")
        # `not s > 0` also rejects NaN.
        if any(not s > 0 for s in std):
            raise ValueError(f"Normalize: every std entry must be positive, got {std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    @property
    def num_channels(self) -> int | None:
        """Number of channels normalized, or None for the identity."""
        return None if self.identity else self.mean.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        if self.identity:
            return x
        # Elementwise ops keep x's memory format; under autocast they run in x's (promoted) dtype.
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        if self.identity:
            return "identity"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def check_channels(norm: Normalize, in_channels: int) -> None:
    """Raise a clear error when a network's normalization does not match its input channels."""
    c = norm.num_channels
    if c is not None and c not in (1, in_channels):
        raise ValueError(f"mean/std have {c} entries but the network has in_channels={in_channels}")
