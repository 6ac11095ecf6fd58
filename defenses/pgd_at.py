"""Adversarial training on the worst case in the eps-ball (Madry et al.) and its single-step kin."""

from __future__ import annotations

import torch.nn.functional as F

from advtrain.attacks import attack_mode, fgsm, fgsm_rs, parse_budget, pgd

from .base import AdversarialDefense
from .outputs import DefenseOutput

TRAINING_ATTACKS = ("pgd", "fgsm", "fgsm_rs")


class PGDAT(AdversarialDefense):
    """min_theta E[ max_{||delta|| <= eps} CE(f(x + delta), y) ], the inner max by an attack.

    Args:
        attack: ``pgd`` (Madry et al. 2018: uniform random start, ``steps`` signed steps of ``step``),
            ``fgsm`` (Goodfellow et al. 2015: one step of eps from x) or ``fgsm_rs`` (Wong et al. 2020,
            'Fast is better than free': uniform start, one step of ``step``, default 1.25 eps).
        step: step size; default 2/255-like 2.5 eps / steps for pgd, 1.25 eps for fgsm_rs.
        steps: PGD iterations (10 for CIFAR-10, 40 for MNIST in Madry et al.).
        norm: ``linf`` or ``l2`` (pgd only).
        **kwargs: the base class's arguments (network, optimizer, lr_scheduler, eps, validation).

    The examples are generated with the network in eval mode (BatchNorm running statistics, no
    dropout); the training forward on them is in train mode.
    """

    def __init__(self, *args, attack: str = "pgd", step: float | str | None = None, steps: int = 10,
                 norm: str = "linf", **kwargs):
        super().__init__(*args, **kwargs)
        if attack not in TRAINING_ATTACKS:
            raise ValueError(f"unknown training attack {attack!r}; choose one of {', '.join(TRAINING_ATTACKS)}")
        self.attack = attack
        self.step = None if step is None else parse_budget(step, "step")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if norm != "linf" and attack != "pgd":
            raise ValueError(f"norm {norm!r} needs attack 'pgd'")
        self.steps = steps
        self.norm = norm

    def make_adversarial(self, x, y):
        with attack_mode(self.network):
            if self.attack == "fgsm":
                return fgsm(self.network, x, y, self.eps, bounds=self.input_bounds)
            if self.attack == "fgsm_rs":
                return fgsm_rs(self.network, x, y, self.eps, step=self.step, bounds=self.input_bounds)
            return pgd(self.network, x, y, self.eps, step=self.step, steps=self.steps, norm=self.norm,
                       bounds=self.input_bounds)

    def defense_loss(self, x, y, batch_idx):
        x_adv = self.make_adversarial(x, y)
        logits_adv = self.network(x_adv)
        ce = F.cross_entropy(logits_adv.float(), y)
        return DefenseOutput(ce, {"ce_adv": ce}, logits_adv=logits_adv, x_adv=x_adv)
