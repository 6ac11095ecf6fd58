"""The precision robustness numbers are computed in: float32 by default, whatever precision training used.

The official AutoAttack, RobustBench and the papers evaluate in float32. Under a bf16-mixed trainer an attack's
forward and backward passes run in bf16, with coarser gradients and logits (a measured AutoAttack was 2 examples
of 360 weaker on digits), so a number from it is not comparable with the papers'. ``bf16-mixed`` is an opt-in
for quick looks on a GPU.
"""

from __future__ import annotations

import torch

PRECISIONS = ("32", "bf16-mixed")


def check_precision(precision: str) -> str:
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ValueError(f"evaluation precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def evaluation_precision(device: torch.device | str, precision: str = "32"):
    """Context manager: autocast off (float32: the network's float32 weights and inputs), or bf16 autocast."""
    device_type = torch.device(device).type
    if check_precision(precision) == "32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=torch.bfloat16)
