"""Seeded random streams. Every randomized computation that must be reproducible and must not move the global
generators (whose state an exact resume restores) draws from a generator of its own: validation and evaluation
random starts per batch, transfer attacks, loss landscapes and t-SNE draws, the covariance tracker's PGD. Its seed
mixes a base seed with the indices of the stream (setting, batch, point, rank, ...)."""

from __future__ import annotations

import torch

SEED_MIX = 1_000_003  # a prime: nearby base seeds and indices never collide in practice


def stream_seed(seed: int, *indices: int) -> int:
    """``((seed * M + i1) * M + i2) ...`` modulo 2**63 - 1 (a valid seed), M = :data:`SEED_MIX`."""
    value = int(seed)
    for index in indices:
        value = value * SEED_MIX + int(index)
    return value % (2**63 - 1)


def seeded_generator(device: torch.device | str, seed: int, *indices: int) -> torch.Generator:
    """A generator on ``device`` seeded with :func:`stream_seed` of ``seed`` and ``indices``."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, *indices))
