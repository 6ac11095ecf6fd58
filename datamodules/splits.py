"""How a training set is split into the examples trained on and the held-out validation examples."""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import DatasetValueError

VAL_SPLITS = ("random", "first_per_class")


def check_val_split(val_split: str, val_size: int, num_classes: int) -> str:
    """``random``: ``val_size`` examples chosen by a permutation seeded with ``split_seed``. ``first_per_class``:
    the first ``val_size / num_classes`` training examples of each class in the files' order (the official NuAT
    scripts hold out the first 100 CIFAR-10 images of each class)."""
    if val_split not in VAL_SPLITS:
        raise ValueError(f"data.val_split must be one of {', '.join(VAL_SPLITS)}, got {val_split!r}")
    if val_split == "first_per_class" and num_classes and val_size % num_classes:
        raise ValueError(f"data.val_size={val_size} with val_split first_per_class must be a multiple of the "
                         f"{num_classes} classes (the same number from each class)")
    return val_split


def holdout(y: Tensor, val_size: int, val_split: str, split_seed: int, num_classes: int,
            name: str) -> tuple[Tensor, Tensor]:
    """(training indices, validation indices), each sorted: the files' order inside each split."""
    if val_split == "random":
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
        return perm[val_size:].sort().values, perm[:val_size].sort().values
    per_class = val_size // num_classes
    firsts = [(y == c).nonzero().flatten()[:per_class] for c in range(num_classes)]
    short = [c for c, first in enumerate(firsts) if len(first) < per_class]
    if short:
        raise DatasetValueError(f"{name}: class {short[0]} has fewer than the {per_class} training examples that "
                                f"data.val_size={val_size} holds out per class; lower data.val_size.")
    held_out = torch.zeros(len(y), dtype=torch.bool)
    held_out[torch.cat(firsts)] = True
    return (~held_out).nonzero().flatten(), held_out.nonzero().flatten()
