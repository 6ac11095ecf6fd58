"""Defenses' losses against their formulas, their attack modes, schedules and exact validation."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from advtrain.callbacks import RobustnessEvaluation
from advtrain.datamodules import Digits
from advtrain.defenses import PGDAT, TRADES, PiecewiseLinearLR, Standard


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(6 * 64, 10)

    def forward(self, x):
        return self.head(self.body(x))


def test_standard_loss_is_cross_entropy(batch):
    torch.manual_seed(0)
    model = Standard(network=BNNet())
    out = model.defense_loss(*batch, 0)
    expected = F.cross_entropy(model.network(batch[0]), batch[1])
    torch.testing.assert_close(out.loss, expected)
    assert out.logits_adv is None and set(out.parts) == {"ce"}


def test_pgdat_trains_on_examples_in_the_ball_and_attacks_in_eval_mode(batch):
    torch.manual_seed(0)
    model = PGDAT(network=BNNet(), eps=0.1, attack={"steps": 3})
    model.train()
    bn = model.network.body[1]
    captured = {}
    original = model.make_adversarial

    def spy(x, y):
        x_adv = original(x, y)
        captured["x_adv"], captured["mean_after_attack"] = x_adv, bn.running_mean.clone()
        return x_adv

    model.make_adversarial = spy
    before = bn.running_mean.clone()
    out = model.defense_loss(*batch, 0)
    assert torch.equal(captured["mean_after_attack"], before)  # the attack did not touch BN statistics
    assert not torch.equal(bn.running_mean, before)  # the training forward did
    assert (captured["x_adv"] - batch[0]).abs().max() <= 0.1 + 1e-6
    assert model.network.training and bn.training  # modes restored
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits_adv, batch[1]))


def test_fgsm_rs_defaults_to_the_fbf_step(batch, monkeypatch):
    from dataclasses import replace

    from advtrain.attacks import ATTACKS

    seen = {}
    spy = replace(ATTACKS["fgsm_rs"], function=lambda net, x, y, eps, step=None, eot=1, bounds=None, generator=None:
                  seen.update(eps=eps, step=step) or x)
    monkeypatch.setitem(ATTACKS, "fgsm_rs", spy)
    PGDAT(network=BNNet(), eps="8/255", attack="fgsm_rs").defense_loss(*batch, 0)
    assert seen["eps"] == pytest.approx(8 / 255) and seen["step"] == pytest.approx(1.25 * 8 / 255)  # the row's
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        PGDAT(network=BNNet(), attack="cw")
    with pytest.raises(ValueError, match="autoattack is not a training attack"):
        PGDAT(network=BNNet(), attack="autoattack")


def test_trades_loss_follows_its_formula(batch):
    torch.manual_seed(0)
    model = TRADES(network=BNNet(), eps=0.1, beta=6.0, attack={"steps": 2, "step": 0.02})
    model.eval()  # deterministic forward for the comparison
    x, y = batch
    x_adv = model.make_adversarial(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    model.make_adversarial = lambda x, y: x_adv
    out = model.defense_loss(x, y, 0)
    p_clean = F.softmax(model.network(x), 1)
    log_p_adv = F.log_softmax(model.network(x_adv), 1)
    kl = (p_clean * (p_clean.log() - log_p_adv)).sum(1).mean()
    expected = F.cross_entropy(model.network(x), y) + 6.0 * kl
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.parts["kl"], kl, rtol=1e-5, atol=1e-6)


def test_trades_inner_maximization_raises_the_kl(batch):
    torch.manual_seed(0)
    model = TRADES(network=BNNet(), eps=0.1, attack={"steps": 5, "step": 0.02}).eval()
    x, y = batch
    x_adv = model.make_adversarial(x, y)
    noise = (x + 0.1 * torch.randn_like(x).sign()).clamp(0, 1)

    def kl(x_other):
        return F.kl_div(F.log_softmax(model.network(x_other), 1), F.softmax(model.network(x), 1),
                        reduction="batchmean")

    assert kl(x_adv) > kl(noise)


def test_piecewise_linear_lr_follows_its_knots_per_batch():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = PiecewiseLinearLR(opt, epochs=[0, 2, 4], factors=[0.0, 1.0, 0.0])
    sched.set_steps_per_epoch(10)
    lrs = []
    for _ in range(41):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and lrs[10] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.2)
    assert lrs[30] == pytest.approx(0.1) and lrs[40] == pytest.approx(0.0)
    state = sched.state_dict()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    sched2 = PiecewiseLinearLR(opt2, epochs=[0, 2, 4], factors=[0.0, 1.0, 0.0])
    sched2.load_state_dict(state)
    assert sched2.last_epoch == sched.last_epoch and sched2.steps_per_epoch == 10
    with pytest.raises(ValueError, match="increase strictly"):
        PiecewiseLinearLR(opt, epochs=[0, 2, 2], factors=[0, 1, 0])


def _trainer(**kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, inference_mode=False, **kwargs)


def test_validation_attack_draws_from_its_own_generator():
    """The PGD random starts come from a per-batch private generator: validation gives the same numbers
    whatever the global RNG holds (and does not consume it, which exact resume relies on)."""
    torch.manual_seed(0)
    model = PGDAT(network=BNNet(), eps=0.1, attack={"steps": 2})
    data = Digits()
    torch.manual_seed(1)
    first = _trainer().validate(model, datamodule=data, verbose=False)[0]
    torch.manual_seed(2)
    second = _trainer().validate(model, datamodule=data, verbose=False)[0]
    assert first == second and first["val/acc_robust"] <= first["val/acc_clean"]
    other_seed = PGDAT(network=model.network, eps=0.1, attack={"steps": 2}, val_seed=7)
    third = _trainer().validate(other_seed, datamodule=data, verbose=False)[0]
    assert third["val/acc_clean"] == first["val/acc_clean"]


def test_evaluation_at_eps_zero_equals_clean_accuracy(tmp_path):
    torch.manual_seed(0)
    model = Standard(network=BNNet())
    _trainer(max_epochs=2, limit_val_batches=0).fit(model, datamodule=Digits())
    evaluation = RobustnessEvaluation(attacks=[{"attack": "pgd", "eps": [0.0, 0.05, 0.3], "steps": 10}],
                                      seed=1)
    _trainer(callbacks=[evaluation], default_root_dir=tmp_path).test(model, datamodule=Digits(), verbose=False)
    results = evaluation.results.to_dict()
    clean, (zero, small, large) = results["clean"]["correct"], [a["correct"] for a in results["attacks"]]
    assert results["n"] == 360 and clean > 250
    assert zero == clean and clean > small > large
    assert (tmp_path / "robustness.json").exists()
