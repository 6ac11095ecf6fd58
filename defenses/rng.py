"""The random number generators' states of every process, in a form ``torch.load(weights_only=True)`` accepts.

Lightning's own helper stores numpy's state as an ndarray, which safe loading rejects; here every array is a
tensor. Under DDP each process has its own streams (random starts, crops, dropout, Tucker masks): the checkpoint
holds one entry per rank, gathered from every process, and each process restores its own. For CUDA only the
process's own device is saved, so a run resumes on a machine with fewer visible GPUs than it was saved on.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn


def rng_states() -> dict:
    """This process's states: torch's CPU generator, numpy, Python, and the current CUDA device's generator."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda_device"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return states


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gathered_rng_states() -> list[dict]:
    """Every process's :func:`rng_states`, in rank order. A collective under DDP: every rank must call it (Lightning
    dumps a checkpoint on every rank, and rank 0 writes it)."""
    mine = rng_states()
    if not _distributed():
        return [mine]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def set_rng_states(saved: list[dict] | dict) -> None:
    """Restore this process's streams from :func:`gathered_rng_states` (or from an older checkpoint's single dict,
    which held rank 0's states and ``cuda``: every visible device's)."""
    if isinstance(saved, dict):  # written before the states were gathered per rank
        _restore(saved)
        return
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    if len(saved) != world:
        rank_zero_warn(f"the checkpoint holds the random streams of {len(saved)} processes and is resumed by {world}: "
                       "the run continues, but not bitwise as it would have without the interruption")
    _restore(saved[rank % len(saved)])


def _restore(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if "cuda_device" in states:
        torch.cuda.set_rng_state(states["cuda_device"], device)
    elif "cuda" in states and device < len(states["cuda"]):  # older checkpoints: one state per visible device
        torch.cuda.set_rng_state(states["cuda"][device], device)
