"""GPU paths (run with `make test-gpu` on a machine with CUDA): no host sync in the attack loop, bf16."""

from __future__ import annotations

import pytest
import torch

from attacks import attack_mode, pgd
from networks import ResNet18

pytestmark = pytest.mark.gpu


def test_pgd_step_loop_never_syncs_with_the_host():
    net = ResNet18().cuda().eval()
    x = torch.rand(16, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    pgd(net, x, y, 8 / 255, steps=2, generator=generator)  # warm up (cudnn, allocator)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with attack_mode(net):
            x_adv = pgd(net, x, y, 8 / 255, steps=5, restarts=2, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6


def test_pgd_under_bf16_autocast_on_gpu_keeps_float32_iterates():
    net = ResNet18().cuda().eval().to(memory_format=torch.channels_last)
    x = torch.rand(16, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x_adv = pgd(net, x, y, 8 / 255, steps=5)
    assert x_adv.dtype == torch.float32 and (x_adv - x).abs().max() <= 8 / 255 + 1e-6
