"""Evaluating randomized (tensorized) networks: EOT attacks, omniscient attacker, draws, theta = 1 transfer."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import DigitsMLP
from torch import nn

from advtrain.attacks import AttackSetting
from advtrain.attacks.core import expected_input_gradient
from advtrain.attacks.losses import cross_entropy
from advtrain.callbacks import RobustnessEvaluation
from advtrain.datamodules import Digits
from advtrain.defenses import Standard
from advtrain.networks import randomness_off, tensorize


class CyclingLinear(nn.Module):
    """A 'randomized' model whose k-th forward uses weight k (mod K): its EOT gradient is known exactly."""

    def __init__(self, weights):
        super().__init__()
        self.weights, self.calls = weights, 0

    def forward(self, x):
        w = self.weights[self.calls % len(self.weights)]
        self.calls += 1
        return x.flatten(1) @ w.T


def test_eot_gradient_is_the_mean_of_the_per_draw_gradients():
    torch.manual_seed(0)
    weights = [torch.randn(3, 4) for _ in range(3)]
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    expected = torch.zeros_like(x)
    for w in weights:  # d CE / dx = W^T (softmax(Wx) - onehot(y))
        expected += (F.softmax(x @ w.T, 1) - F.one_hot(y, 3)) @ w / 3
    got = expected_input_gradient(CyclingLinear(weights), cross_entropy, x.clone(), y, draws=3)
    torch.testing.assert_close(got, expected)
    single = expected_input_gradient(CyclingLinear(weights), cross_entropy, x.clone(), y, draws=1)
    torch.testing.assert_close(single, (F.softmax(x @ weights[0].T, 1) - F.one_hot(y, 3)) @ weights[0])


def test_eot_is_validated_and_named():
    setting = AttackSetting("pgd", eps=0.1, steps=5, eot=8).expand()[0]
    assert setting.name == "pgd-5 eot8 eps=0.1" and setting.as_dict()["eot_samples"] == 8
    assert AttackSetting("fgsm", eps=0.1, omniscient=True).expand()[0].name == "fgsm omniscient eps=0.1"
    with pytest.raises(ValueError, match="eot is supported"):
        AttackSetting("gama_pgd", eps=0.1, eot=4)
    with pytest.raises(ValueError, match="unknown surrogate"):
        AttackSetting("pgd", eps=0.1, surrogate="sigmoid")
    kurakin = AttackSetting("pgd", eps=["1/255", "8/255", "128/255"], steps="kurakin", step="1/255").expand()
    assert [s.resolved_steps for s in kurakin] == [1, 10, 132]  # floor(min(eps + 4, 1.25 eps))


@pytest.fixture(scope="module")
def tensorized_state(tmp_path_factory):
    """A digits MLP trained clean, its hidden layer tensorized at full rank with theta 0.7, fine-tuned a little
    (with Adam: the 1/theta rescaled draws are noisy at first and SGD at lr 0.1 diverges on this BN-free MLP)."""
    torch.manual_seed(0)
    model = Standard(network=DigitsMLP(hidden=64), eps=0.1, val_attack={"steps": 1})
    trainer = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                   inference_mode=False, limit_val_batches=0)
    pl.Trainer(max_epochs=6, **trainer).fit(model, datamodule=Digits())
    model = Standard(network=tensorize(model.network, theta=0.7, exclude=["head"]), eps=0.1, val_attack={"steps": 1},
                     optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))
    pl.Trainer(max_epochs=6, **trainer).fit(model, datamodule=Digits())
    return model.network.state_dict()


def evaluate(tmp_path, state, attacks, **kwargs):
    network = tensorize(DigitsMLP(hidden=64), theta=0.7, exclude=["head"])
    network.load_state_dict(state)
    evaluation = RobustnessEvaluation(attacks=attacks, **kwargs)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False,
                         default_root_dir=tmp_path, callbacks=[evaluation])
    trainer.test(Standard(network=network, eps=0.1), datamodule=Digits(), verbose=False)
    return evaluation.results.to_dict()


def test_eot_pgd_is_no_weaker_than_pgd_and_results_record_the_draws(tmp_path, tensorized_state):
    suite = [{"attack": "pgd", "eps": 0.1, "steps": 10}, {"attack": "pgd", "eps": 0.1, "steps": 10, "eot": 8},
             {"attack": "pgd", "eps": 0.1, "steps": 10, "omniscient": True}]
    results = evaluate(tmp_path, tensorized_state, suite, draws=6, limit=150, seed=3)
    assert results["randomized"] and results["draws"] == 6
    plain, eot, omniscient = results["attacks"]
    n = results["n"]
    assert eot["eot_samples"] == 8 and plain["eot_samples"] == 1 and omniscient["omniscient"]
    # sampling error of a mean over n * draws Bernoulli outcomes; EOT may tie but must not be clearly weaker
    assert eot["accuracy"] <= plain["accuracy"] + 3 * math.sqrt(0.25 / (n * 6))
    assert plain["accuracy"] < results["clean"]["accuracy"]
    # a randomized model attacked without EOT says so, per setting and in the note
    assert plain["single_draw_gradient"] and not eot["single_draw_gradient"]
    assert "no EOT" in results["note"] and plain["name"] in results["note"] and eot["name"] not in results["note"]
    # the sanity checks add the transfer attack from the same network at theta = 1 and judge it
    labels = [t["name"] for t in results["transfer"]]
    assert labels == [f"transfer[theta=1] {a['name']}" for a in results["attacks"][:2]]  # omniscient: itself
    assert any(v["check"].startswith("transfer_not_stronger") for v in results["sanity"]["verdicts"])
    markdown = (tmp_path / "robustness.md").read_text()
    assert f"{plain['name']} (no EOT)" in markdown and f"{eot['name']} (no EOT)" not in markdown


def test_omniscient_examples_are_crafted_at_theta_one(tmp_path, tensorized_state):
    """The omniscient setting's examples equal PGD run by hand on the network with randomness off."""
    from advtrain.evaluation import craft

    torch.manual_seed(0)
    network = tensorize(DigitsMLP(hidden=64), theta=0.7, exclude=["head"])
    network.load_state_dict(tensorized_state)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    setting = AttackSetting("pgd", eps=0.1, steps=5, omniscient=True).expand()[0]
    got = craft(setting, network, x, y, torch.Generator().manual_seed(1))
    with randomness_off(network):
        expected = setting.run(network.eval(), x, y, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # and not what a randomized attacker would have produced
    plain = AttackSetting("pgd", eps=0.1, steps=5).expand()[0]
    assert not torch.equal(craft(plain, network, x, y, torch.Generator().manual_seed(1)), got)
