"""NuAT: the nuclear-norm attack against its formula, the lambda ramp, two-step / hybrid / WA variants."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import DigitsMLP
from torch import nn

from advtrain.attacks import nuclear_norm, nuclear_norm_step, nuclear_two_step
from advtrain.datamodules import Digits
from advtrain.defenses import LinearRamp, NuAT


def direct_nuclear_step(model, x, y, eps, a, lam, seed):
    """The formula of the paper / docs/methods.md, written out."""
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
    x0 = (x + torch.where(u < 0.5, -a, a)).clamp(0, 1).requires_grad_(True)
    clean = model(x).detach()
    out = model(x0)
    loss = F.cross_entropy(out, y) + lam * torch.linalg.matrix_norm(out - clean, ord="nuc") / x.shape[0]
    (grad,) = torch.autograd.grad(loss, x0)
    delta = (x0.detach() + eps * grad.sign() - x).clamp(-eps, eps)
    return (x + delta).clamp(0, 1)


def test_nuclear_norm_step_equals_the_formula(batch):
    torch.manual_seed(0)
    model = DigitsMLP().eval()
    x, y = batch
    ours = nuclear_norm_step(model, x, y, 0.1, clean_logits=model(x), lam=3.0, start_scale=0.05,
                             generator=torch.Generator().manual_seed(7))
    expected = direct_nuclear_step(model, x, y, 0.1, 0.05, 3.0, seed=7)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert (ours - x).abs().max() <= 0.1 + 1e-6 and ours.min() >= 0 and ours.max() <= 1
    # the nuclear term changes the attack; without it the step is plain CE
    ce_only = nuclear_norm_step(model, x, y, 0.1, clean_logits=model(x), lam=3.0, start_scale=0.05,
                                use_nuclear=False, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ce_only, direct_nuclear_step(model, x, y, 0.1, 0.05, 0.0, seed=7), rtol=0, atol=1e-6)
    assert not torch.equal(ce_only, ours)


def test_nuclear_norm_is_the_sum_of_singular_values():
    m = torch.randn(16, 10)
    assert torch.allclose(nuclear_norm(m), torch.linalg.svdvals(m).sum())


def test_two_step_takes_its_second_step_on_ce_within_the_ball(batch):
    torch.manual_seed(0)
    model = DigitsMLP().eval()
    x, y = batch
    g = torch.Generator().manual_seed(3)
    x2 = nuclear_two_step(model, x, y, 0.1, clean_logits=model(x), lam=2.0, generator=g)
    x1 = nuclear_norm_step(model, x, y, 0.1, clean_logits=model(x), lam=2.0, generator=torch.Generator().manual_seed(3))
    x1g = x1.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x1g), y), x1g)
    expected = (x + (x1 + 0.1 * grad.sign() - x).clamp(-0.1, 0.1)).clamp(0, 1)
    torch.testing.assert_close(x2, expected, rtol=0, atol=1e-6)


def official_lambdas(lambda_max, epochs, ramp_epochs):
    """lambda of each epoch as the official scripts' loops compute it: from 0, += lambda_max / ramp_epochs at the
    end of each epoch while epoch < ramp_epochs (NuAT_cifar10.py: ramp_epochs = epochs - 10; the others: epochs)."""
    lam, out = 0.0, []
    for epoch in range(epochs):
        out.append(lam)
        if epoch < ramp_epochs:
            lam += lambda_max / ramp_epochs
    return out


@pytest.mark.parametrize("lambda_max,epochs,ramp_epochs", [(4.5, 100, 90), (4.0, 100, 100), (4.0, 55, 55)])
def test_lambda_ramp_matches_the_official_loops(lambda_max, epochs, ramp_epochs):
    ramp = LinearRamp(lambda_max, ramp_epochs)
    assert [ramp(e) for e in range(epochs)] == pytest.approx(official_lambdas(lambda_max, epochs, ramp_epochs),
                                                            rel=1e-12, abs=1e-12)


def test_lambda_ramp_reaches_its_maximum_only_with_the_ramp_shorter_than_the_run():
    # NuAT_cifar10.py: 4.5 from epoch 90 on; the WA scripts' ramp over the whole run stops one step short
    assert LinearRamp(4.5, 90)(90) == LinearRamp(4.5, 90)(99) == 4.5
    assert LinearRamp(4.0, 100)(99) == pytest.approx(3.96)
    with pytest.raises(ValueError):
        LinearRamp(4.0, 0)


def test_nuat_loss_is_clean_ce_plus_lambda_nuclear(batch):
    torch.manual_seed(0)
    model = NuAT(network=DigitsMLP(), eps=0.1, lambda_max=4.0, lambda_ramp_epochs=10)
    model.current_lambda = lambda: 2.0
    x, y = batch
    out = model.defense_loss(x, y, 0)
    ce = F.cross_entropy(out.logits_clean, y)
    nuc = torch.linalg.matrix_norm(out.logits_adv - out.logits_clean, ord="nuc") / 32
    torch.testing.assert_close(out.loss, ce + 2.0 * nuc)
    assert set(out.parts) == {"ce", "nuclear", "lambda"} and out.parts["lambda"] == 2.0
    # logged as a CPU tensor: Lightning would turn a float into a tensor on the device (a copy every step)
    assert out.parts["lambda"].device.type == "cpu"
    assert (out.logits_adv.shape, out.logits_clean.shape) == ((32, 10), (32, 10))


def test_hybrid_switches_to_two_steps_at_its_epoch():
    model = NuAT(network=DigitsMLP(), two_step_from_epoch=3, nuclear_every=2, two_step_nuclear_every=1)
    steps, every = [], []
    for epoch in range(5):
        type(model).current_epoch = property(lambda self, e=epoch: e)
        steps.append(model.steps_this_epoch())
        every.append(model.nuclear_every_this_epoch())
    del type(model).current_epoch
    assert steps == [1, 1, 1, 2, 2]
    assert every == [2, 2, 2, 1, 1]  # NuAT's alternate batches, then NuAT2's every batch
    assert NuAT(network=DigitsMLP(), two_step_from_epoch=3).nuclear_every_this_epoch() == 2  # default: unchanged
    with pytest.raises(ValueError, match="two_step_nuclear_every"):
        NuAT(network=DigitsMLP(), two_step_nuclear_every=0)


class CountingNet(nn.Module):
    """Stands in for the fast EMA network; counts its forwards."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_nuat2_wa_takes_its_first_step_on_the_fast_ema_without_gradients_into_it(batch):
    torch.manual_seed(0)
    model = NuAT(network=DigitsMLP(), attack_steps=2, attack_on_ema=True, nuclear_every=1)
    fast = CountingNet(DigitsMLP()).requires_grad_(False)

    class FakeEMA:
        attack_decay = 0.99

        def attack_network(self):
            return fast

    model.callback_with = lambda attribute: FakeEMA() if attribute == "attack_network" else None  # no trainer
    model.current_lambda = lambda: 1.0
    out = model.defense_loss(*batch, 0)
    out.loss.backward()
    assert fast.calls == 2  # its clean logits, and the first attack step
    assert all(p.grad is None for p in fast.parameters())
    assert all(p.grad is not None for p in model.network.parameters())
    # with no fast network yet (first epoch) the current network takes the first step
    FakeEMA.attack_network = lambda self: None
    fast.calls = 0
    model.defense_loss(*batch, 0)
    assert fast.calls == 0


def test_attack_on_ema_without_the_callback_says_what_to_add(batch):
    model = NuAT(network=DigitsMLP(), attack_steps=2, attack_on_ema=True)
    with pytest.raises(RuntimeError, match="advtrain.callbacks.EMA"):
        model.defense_loss(*batch, 0)


def test_nuat_wa_trains_with_the_fast_average_from_the_second_epoch():
    from advtrain.callbacks import EMA

    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                seen.append(pl_module.fast_ema_network() is not None)

    torch.manual_seed(0)
    model = NuAT(network=DigitsMLP(), eps=0.1, attack_steps=2, attack_on_ema=True, val_attack={"steps": 1})
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, inference_mode=False, limit_train_batches=3, limit_val_batches=1,
                         callbacks=[EMA(decay=0.9, attack_decay=0.5), Probe()])
    trainer.fit(model, datamodule=Digits())
    assert seen == [False, True]
