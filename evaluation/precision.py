"""The precision robustness numbers are computed in: float32 by default, whatever precision training used.

The official AutoAttack, RobustBench and the papers evaluate in float32. Under a bf16-mixed trainer an attack's
forward and backward passes run in bf16, with coarser gradients and logits (a measured AutoAttack was 2 examples
of 360 weaker on digits), so a number from it is not comparable with the papers'. ``bf16-mixed`` is an opt-in
for quick looks on a GPU.

On a GPU two more settings change the numbers and are set for the evaluation, then put back:

* cuDNN's autotuning (``benchmark: true`` in gpu.yaml and ddp.yaml) may pick different convolution algorithms in
  each DDP process, so a batch attacked by rank 1 could differ in rounding from the same batch attacked by one
  process: the evaluation runs cuDNN's deterministic algorithms without autotuning;
* cuDNN's convolutions (and, where enabled, CUDA matmuls) use TF32 by default on Ampere and later GPUs, which
  keeps 10 mantissa bits: a float32 evaluation turns TF32 off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

PRECISIONS = ("32", "bf16-mixed")


def check_precision(precision: str) -> str:
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ValueError(f"evaluation precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


@contextmanager
def evaluation_precision(device: torch.device | str, precision: str = "32") -> Iterator[None]:
    """Autocast off (float32: the network's float32 weights and inputs) or bf16 autocast, with cuDNN's
    deterministic algorithms and no autotuning, and no TF32 in float32; the backend flags are restored after."""
    device_type = torch.device(device).type
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32
    cudnn.benchmark, cudnn.deterministic = False, True
    if check_precision(precision) == "32":
        cudnn.allow_tf32 = matmul.allow_tf32 = False
        autocast = torch.autocast(device_type, enabled=False)
    else:
        autocast = torch.autocast(device_type, dtype=torch.bfloat16)
    try:
        with autocast:
            yield
    finally:
        cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = saved
