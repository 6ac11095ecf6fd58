"""Batched image transforms that run on the model's device (no per-example Python, no data-loader workers)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_crop_flip", "to_unit_float"]


def to_unit_float(x: Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1]; floating inputs keep their values."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def random_crop_flip(x: Tensor, padding: int, flip: bool) -> Tensor:
    """Random crop after zero padding by ``padding`` pixels and random horizontal flip, per example.

    ``x`` is (N, C, H, W) of any dtype; offsets and flips come from the global RNG of ``x``'s device.
    Two gathers (rows, then columns) index the padded batch, so the cost is one pass over the batch.
    """
    n, c, h, w = x.shape
    device = x.device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    if padding > 0:
        x = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        rows = rows + torch.randint(0, 2 * padding + 1, (n, 1), device=device)
        cols = cols + torch.randint(0, 2 * padding + 1, (n, 1), device=device)
        x = x.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    if flip:
        flipped = torch.rand(n, 1, device=device) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))
