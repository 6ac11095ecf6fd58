"""Adversarial training on the worst case in the eps-ball (Madry et al.) and its single-step kin."""

from __future__ import annotations

import torch.nn.functional as F

from advtrain.attacks import AttackSetting, attack_mode

from .base import AdversarialDefense
from .outputs import DefenseOutput


class PGDAT(AdversarialDefense):
    """min_theta E[ max_{||delta|| <= eps} CE(f(x + delta), y) ], the inner max by a training attack.

    Args:
        attack: the training attack, a setting of the attack table (any row that trains), as in an evaluation
            suite: ``{attack: pgd, steps: 10}`` (the default: Madry et al. 2018, uniform random start, 10 signed
            steps of 2.5 eps / steps), ``{attack: pgd, steps: 40, step: 0.01}`` (MNIST), ``{attack: fgsm}``
            (Goodfellow et al. 2015) or ``{attack: fgsm_rs, step: 10/255}`` (Wong et al. 2020, 'Fast is better than
            free'; default step 1.25 eps). Its budget is the defense's ``eps`` unless it sets one; ``norm: l2``
            for PGD in the L2 ball.
        **kwargs: the base class's arguments (network, optimizer, lr_scheduler, eps, validation).

    The examples are generated with the network in eval mode (BatchNorm running statistics, no
    dropout); the training forward on them is in train mode.
    """

    def __init__(self, *args, attack: dict | str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.attack = AttackSetting.from_config(attack, self.eps, "PGDAT attack", default={"attack": "pgd", "steps": 10}
                                                ).check_training((), "PGDAT")

    def make_adversarial(self, x, y):
        with attack_mode(self.network):
            return self.attack.run(self.network, x, y, bounds=self.input_bounds)

    def defense_loss(self, x, y, batch_idx):
        x_adv = self.make_adversarial(x, y)
        logits_adv = self.network(x_adv)
        ce = F.cross_entropy(logits_adv.float(), y)
        return DefenseOutput(ce, {"ce_adv": ce}, logits_adv=logits_adv, x_adv=x_adv)
