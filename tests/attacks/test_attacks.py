"""Attacks against independent references (torchattacks, a linear model) and their invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from advtrain.attacks import (
    AttackSetting,
    attack_mode,
    bernoulli_start,
    bim,
    bim_steps,
    cross_entropy,
    fgsm,
    fgsm_rs,
    format_budget,
    mim,
    parse_budget,
    pgd,
    projected_gradient,
)


@pytest.fixture
def cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(8 * 8 * 8, 10)).eval()


@pytest.fixture
def batch(digits_tensors):
    x, y, _, _ = digits_tensors
    return x[:64], y[:64]


def test_fgsm_equals_torchattacks(cnn, batch):
    x, y = batch
    ours = fgsm(cnn, x, y, "8/255")
    theirs = torchattacks.FGSM(cnn, eps=8 / 255)(x, y)
    assert torch.equal(ours, theirs)


def test_pgd_without_random_start_equals_torchattacks(cnn, batch):
    x, y = batch
    ours = pgd(cnn, x, y, 0.1, step=0.02, steps=7, random_start=False)
    theirs = torchattacks.PGD(cnn, eps=0.1, alpha=0.02, steps=7, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.equal(ours, x)


def test_pgd_l2_without_random_start_equals_torchattacks(cnn, batch):
    x, y = batch
    ours = pgd(cnn, x, y, 1.0, step=0.2, steps=7, norm="l2", random_start=False)
    theirs = torchattacks.PGDL2(cnn, eps=1.0, alpha=0.2, steps=7, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_mim_equals_torchattacks(cnn, batch):
    x, y = batch
    ours = mim(cnn, x, y, 0.1, step=0.02, steps=6)
    theirs = torchattacks.MIFGSM(cnn, eps=0.1, alpha=0.02, steps=6, decay=1.0)(x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_fgsm_on_a_linear_model_matches_the_analytic_direction():
    """For logits W x, grad_x CE points along sum_j p_j w_j - w_y; for two classes its sign is
    sign(w_other - w_y) wherever that is non-zero."""
    w = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 1.0, 2.0]])
    model = nn.Linear(3, 2, bias=False)
    model.weight.data.copy_(w)
    x = torch.full((4, 3), 0.5)
    y = torch.tensor([0, 1, 0, 1])
    expected = (x + 0.1 * torch.sign(w[1 - y] - w[y])).clamp(0, 1)
    assert torch.equal(fgsm(model, x, y, 0.1), expected)


@pytest.mark.parametrize("name,kwargs", [
    ("fgsm", {}), ("fgsm_rs", {}), ("bim", {"steps": 5}), ("pgd", {"steps": 5}),
    ("pgd_l2", {"steps": 5, "norm": "l2"}), ("mim", {"steps": 5}), ("pgd_restarts", {"steps": 3, "restarts": 3}),
])
def test_every_attack_respects_budget_and_range(cnn, batch, name, kwargs):
    x, y = batch
    eps = 1.5 if kwargs.get("norm") == "l2" else 0.1
    attack = {"fgsm": fgsm, "fgsm_rs": fgsm_rs, "bim": bim, "pgd": pgd, "pgd_l2": pgd, "mim": mim,
              "pgd_restarts": pgd}[name]
    x_adv = attack(cnn, x, y, eps, **kwargs)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if kwargs.get("norm") == "l2":
        assert delta.norm(dim=1).max() <= eps * (1 + 1e-5)
    else:
        assert delta.abs().max() <= eps + 1e-6
    assert delta.abs().max() > 0  # it moved
    assert all(p.grad is None for p in cnn.parameters())  # input-only gradients


def test_pgd_loss_is_not_below_fgsm(trained_mlp, digits_tensors):
    _, _, x, y = digits_tensors
    with torch.no_grad():
        clean = cross_entropy(trained_mlp(x), y).mean()
        loss_fgsm = cross_entropy(trained_mlp(fgsm(trained_mlp, x, y, 0.1)), y).mean()
        loss_pgd = cross_entropy(trained_mlp(pgd(trained_mlp, x, y, 0.1, steps=20, step=0.01,
                                                 random_start=False)), y).mean()
    assert clean < loss_fgsm <= loss_pgd


def test_robust_accuracy_falls_monotonically_with_eps(trained_mlp, digits_tensors):
    _, _, x, y = digits_tensors
    accuracies = []
    for eps in [0.0, 0.02, 0.05, 0.1, 0.2, 0.3]:
        x_adv = pgd(trained_mlp, x, y, eps, steps=20, random_start=False) if eps > 0 else x
        with torch.no_grad():
            accuracies.append((trained_mlp(x_adv).argmax(1) == y).float().mean().item())
    assert accuracies[0] > 0.9
    assert all(b <= a for a, b in zip(accuracies, accuracies[1:])), accuracies
    assert accuracies[-1] < 0.2


def test_restarts_keep_each_examples_worst_case(trained_mlp, digits_tensors):
    _, _, x, y = digits_tensors
    one = pgd(trained_mlp, x, y, 0.05, steps=5, generator=torch.Generator().manual_seed(3))
    five = pgd(trained_mlp, x, y, 0.05, steps=5, restarts=5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        wrong_one = trained_mlp(one).argmax(1) != y
        wrong_five = trained_mlp(five).argmax(1) != y
        loss_one, loss_five = cross_entropy(trained_mlp(one), y), cross_entropy(trained_mlp(five), y)
    # the first restart is the single run; later ones can only make an example worse
    assert bool((wrong_five | ~wrong_one).all())
    assert wrong_five.sum() > wrong_one.sum()
    same = wrong_five == wrong_one
    assert bool((loss_five[same] >= loss_one[same] - 1e-6).all())


def test_random_start_is_reproducible_with_a_generator(cnn, batch):
    x, y = batch
    a = pgd(cnn, x, y, 0.1, steps=2, generator=torch.Generator().manual_seed(5))
    b = pgd(cnn, x, y, 0.1, steps=2, generator=torch.Generator().manual_seed(5))
    c = pgd(cnn, x, y, 0.1, steps=2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bernoulli_start_has_exactly_plus_minus_a():
    x = torch.rand(8, 3, 4, 4)
    start = bernoulli_start(x, 4 / 255, torch.Generator().manual_seed(0))
    assert set(start.unique().tolist()) == {-4 / 255 * 1.0, 4 / 255 * 1.0} or torch.allclose(
        start.abs(), torch.full_like(start, 4 / 255))
    assert torch.equal(start.abs(), torch.full_like(start, 4 / 255))
    assert 0.4 < (start > 0).float().mean() < 0.6


def test_attack_under_bf16_autocast(trained_mlp, digits_tensors):
    _, _, x, y = digits_tensors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd(trained_mlp, x, y, 0.1, steps=10)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        assert cross_entropy(trained_mlp(x_adv), y).mean() > 3 * cross_entropy(trained_mlp(x), y).mean()


def test_bim_default_iterations_follow_kurakin():
    assert [bim_steps(e / 255) for e in (1, 2, 4, 8, 16, 32)] == [1, 2, 5, 10, 20, 36]


def test_attack_mode_restores_mixed_submodule_modes(cnn):
    cnn.train()
    cnn[1].eval()  # a frozen BatchNorm inside a training model
    before = [m.training for m in cnn.modules()]
    with attack_mode(cnn):
        assert not any(m.training for m in cnn.modules())
    assert [m.training for m in cnn.modules()] == before
    with pytest.raises(RuntimeError), attack_mode(cnn):
        raise RuntimeError("boom")
    assert [m.training for m in cnn.modules()] == before


def test_attack_mode_keeps_batchnorm_statistics(cnn, batch):
    x, y = batch
    cnn.train()
    stats = cnn[1].running_mean.clone()
    with attack_mode(cnn):
        pgd(cnn, x, y, 0.1, steps=3)
    assert torch.equal(cnn[1].running_mean, stats)


def test_budget_parsing():
    assert parse_budget("8/255") == pytest.approx(8 / 255)
    assert parse_budget(0.3) == 0.3 and parse_budget("0.5") == 0.5 and parse_budget(0) == 0.0
    for bad in (-0.1, "-8/255", "eight", "1/0", float("nan"), True, None):
        with pytest.raises(ValueError):
            parse_budget(bad)
    assert format_budget(8 / 255) == "8/255" and format_budget(0.3) == "0.3"


@pytest.mark.parametrize("kwargs,message", [
    ({"attack": "pgdd"}, "unknown attack 'pgdd'"),
    ({"attack": "pgd", "eps": -0.1}, "eps must be a finite number >= 0"),
    ({"attack": "pgd", "steps": 0}, "steps must be an integer >= 1"),
    ({"attack": "fgsm", "steps": 5}, "single-step"),
    ({"attack": "bim", "restarts": 3}, "no random start"),
    ({"attack": "pgd", "norm": "l3"}, "unknown norm"),
    ({"attack": "pgd", "eps": "8/2x5"}, "cannot read"),
])
def test_attack_setting_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttackSetting(**kwargs)


def test_attack_setting_expands_budgets_and_resolves_defaults():
    settings = AttackSetting("pgd", eps=["2/255", "8/255"], steps=20).expand()
    assert [s.name for s in settings] == ["pgd-20 eps=2/255", "pgd-20 eps=8/255"]
    assert settings[1].resolved_step == pytest.approx(2.5 * 8 / 255 / 20)
    assert AttackSetting("bim", eps="8/255").resolved_steps == 10


def test_core_rejects_impossible_arguments(cnn, batch):
    x, y = batch
    with pytest.raises(ValueError, match="steps"):
        projected_gradient(cnn, x, y, eps=0.1, step=0.01, steps=0)
    with pytest.raises(ValueError, match="eps"):
        projected_gradient(cnn, x, y, eps=-1, step=0.01, steps=1)
    with pytest.raises(TypeError, match="floating-point"):
        projected_gradient(cnn, (x * 255).to(torch.uint8), y, eps=0.1, step=0.01, steps=1)


def test_fgsm_rs_uses_the_fbf_step(cnn, batch):
    """From the same random start, one signed step of 1.25 eps then projection (Wong et al.)."""
    x, y = batch
    g = torch.Generator().manual_seed(0)
    x_adv = fgsm_rs(cnn, x, y, 0.1, generator=g)
    start = (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 1) * 0.1
    x0 = (x + start).clamp(0, 1).requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(cnn(x0), y, reduction="sum"), x0)
    expected = (x + (x0.detach() + 0.125 * grad.sign() - x).clamp(-0.1, 0.1)).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-6)


def test_gama_settings_run_from_the_registry(trained_mlp, digits_tensors):
    _, _, x, y = digits_tensors
    for name in ("gama_pgd", "gama_fw"):
        setting = AttackSetting(name, eps=0.1, steps=20).expand()[0]
        x_adv = setting.run(trained_mlp, x, y, generator=torch.Generator().manual_seed(0))
        assert (x_adv - x).abs().max() <= 0.1 + 1e-6
        with torch.no_grad():
            assert (trained_mlp(x_adv).argmax(1) == y).float().mean() < (trained_mlp(x).argmax(1) == y).float().mean()
    assert AttackSetting("gama_pgd", eps="8/255").expand()[0].name == "gama_pgd-100 eps=8/255"
