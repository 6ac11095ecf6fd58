"""TRADES (Zhang et al., ICML 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advtrain.attacks import AttackSetting, attack_mode

from .base import AdversarialDefense
from .outputs import DefenseOutput


class TRADES(AdversarialDefense):
    """CE(f(x), y) + beta * KL(p(x) || p(x_adv)), x_adv maximizing the KL term in the eps-ball.

    Follows the official code (yaodongyu/TRADES): the inner maximization (the attack table's ``trades_kl``) starts
    at x + 0.001 N(0, I) (projected onto the box here), takes ``steps`` signed steps of ``step`` on the summed KL
    with the network in eval mode; the outer KL is 'batchmean'.

    Args:
        beta: the trade-off (6.0 in the paper's CIFAR-10 and MNIST results).
        attack: the inner maximization, a setting of the attack table: ``{attack: trades_kl, steps: 10, step:
            2/255}`` (the default; CIFAR-10 0.007 ~ 2/255, MNIST ``steps: 40, step: 0.01``). Any other training
            attack (e.g. ``{attack: pgd}``, on CE) gives a TRADES variant; this defense hands each the clean logits.
    """

    def __init__(self, *args, beta: float = 6.0, attack: dict | str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = beta
        self.attack = AttackSetting.from_config(attack, self.eps, "TRADES attack",
                                                default={"attack": "trades_kl", "steps": 10, "step": "2/255"}
                                                ).check_training(("clean_logits",), "TRADES")

    def make_adversarial(self, x, y):
        with attack_mode(self.network):
            with torch.no_grad():
                clean_logits = self.network(x)
            return self.attack.run(self.network, x, y, bounds=self.input_bounds, clean_logits=clean_logits)

    def defense_loss(self, x, y, batch_idx):
        x_adv = self.make_adversarial(x, y)
        logits_clean = self.network(x)
        logits_adv = self.network(x_adv)
        ce = F.cross_entropy(logits_clean.float(), y)
        kl = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_clean.float(), dim=1),
                      reduction="batchmean")
        return DefenseOutput(ce + self.beta * kl, {"ce": ce, "kl": kl}, logits_clean, logits_adv, x_adv)
