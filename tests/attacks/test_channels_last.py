"""Every attack of the table on channels_last inputs and weights (what configs/trainer/gpu.yaml sets), on a
3-channel network: the same examples as on the same network and inputs in the default memory format, and the
input's memory format kept. AutoAttack runs its FAB and Square stages on points that APGD left robust (the crash
of torchattacks' FAB on channels_last gradients showed only there)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain.attacks import ATTACKS, AttackSetting, autoattack_run

CHANNELS_LAST = torch.channels_last


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


@pytest.fixture(scope="module")
def pair():
    """The same network and inputs twice: in the default memory format and in channels_last."""
    plain = network()
    last = network().to(memory_format=CHANNELS_LAST)
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = plain(x).argmax(1)  # labels the network gets right: every attack has points to work on
    return plain, last, x, y


SETTINGS = {name: {} for name, spec in ATTACKS.items() if not AttackSetting(name).expand()[0].required_context()}
SETTINGS.update(pgd={"steps": 3}, bim={"steps": 3}, mim={"steps": 3}, pgd_targeted={"steps": 3},
                bim_targeted={"steps": 3}, mim_targeted={"steps": 3}, gama_pgd={"steps": 5}, gama_fw={"steps": 5},
                deepfool={"steps": 5}, lrc={"samples": 3}, uniform_noise={"samples": 2})


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_attack_runs_on_channels_last_and_matches_the_default_format(pair, name):
    plain, last, x, y = pair
    setting = AttackSetting(name, **SETTINGS[name]).expand()[0]
    reference = setting.run(plain, x, y, generator=torch.Generator().manual_seed(0))
    x_last = x.contiguous(memory_format=CHANNELS_LAST)
    x_adv = setting.run(last, x_last, y, generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and x_adv.is_contiguous(memory_format=CHANNELS_LAST)
    # convolutions sum in another order in the other memory format: the same examples up to float rounding (a sign
    # step may flip where a gradient entry is within rounding of zero)
    differ = (x_adv - reference).abs().gt(1e-4).float().mean().item()
    assert differ < 0.01, f"{100 * differ:.1f}% of the entries differ"


def test_autoattack_runs_fab_and_square_on_channels_last_survivors(pair):
    plain, last, x, y = pair
    eps = 1e-3  # so small that APGD leaves points robust and the later stages run
    x_last = x.contiguous(memory_format=CHANNELS_LAST)
    x_adv, report = autoattack_run(last, x_last, y, eps)
    attacked = {stage["name"]: stage["attacked"] for stage in report["attacks"]}
    assert attacked["fab-t"] > 0 and attacked["square"] > 0, attacked
    assert x_adv.is_contiguous(memory_format=CHANNELS_LAST)
    reference, plain_report = autoattack_run(plain, x, y, eps)
    assert report["robust"] == plain_report["robust"]
    assert (x_adv - x).abs().max() <= eps + 1e-6
