"""The adversarially augmented baseline of the SGR paper: a mixture of clean and adversarial cross-entropy.

Roth, Kilcher and Hofmann 2018 (arXiv 1805.08736), eq. 3, their rows "FGSM-aug" and "PGD-aug":

    L = (1 - lam) E[CE(f(x), y)] + lam E[CE(f(x + xi), y)],

xi crafted by FGSM or PGD with the model's PREDICTED label argmax f(x) rather than the true one, so that the
adversarial examples carry no information about the label (label leaking, Kurakin et al. 2016, which the paper
cites), and clipped to the input range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.attacks import attack_mode, fgsm, parse_budget, pgd

from .base import AdversarialDefense
from .outputs import DefenseOutput

MIXTURE_ATTACKS = ("fgsm", "pgd")


class MixtureAT(AdversarialDefense):
    """(1 - lam) CE(f(x), y) + lam CE(f(x + xi), y), xi crafted on the predicted label (SGR paper, eq. 3).

    Args:
        network: the classifier.
        lam: weight of the adversarial term, in [0, 1]; default 0.5 (Kurakin et al.'s and R+FGSM's even mix; the
            SGR paper's value is lost, docs/methods.md).
        attack: ``fgsm`` (one signed step of eps from x) or ``pgd`` (uniform random start, ``steps`` signed steps
            of ``step``, projection), both with the budget ``eps`` of the base class.
        steps, step: PGD's iterations and step size (default 2.5 eps / steps); unused by FGSM.
        **kwargs: the base class's arguments (optimizer, lr_scheduler, eps, validation settings).

    The predicted label and the adversarial examples are computed with the network in eval mode
    (``advtrain.attacks.attack_mode``: BatchNorm running statistics, no dropout), our standard for crafting; the label
    is
    therefore the one the crafting network assigns, from one extra no-grad forward (our choice: the paper does not
    say which mode predicts). The two training forwards (clean, adversarial) are separate, in train mode.
    Logged parts: ``ce_clean``, ``ce_adv``, ``lam``.
    """

    def __init__(self, network: nn.Module, lam: float = 0.5, attack: str = "fgsm", steps: int = 10,
                 step: float | str | None = None, **kwargs):
        super().__init__(network, **kwargs)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be a number in [0, 1] (the adversarial term's weight), got {lam!r}")
        if attack not in MIXTURE_ATTACKS:
            raise ValueError(f"unknown attack {attack!r} for MixtureAT; choose one of {', '.join(MIXTURE_ATTACKS)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        self.lam, self.attack, self.steps = float(lam), attack, steps
        self.step = None if step is None else parse_budget(step, "step")

    def predicted_labels(self, x: Tensor) -> Tensor:
        """argmax f(x) in the crafting mode; stays on the device (no sync)."""
        with torch.no_grad(), attack_mode(self.network):
            return self.network(x).argmax(1)

    def make_adversarial(self, x: Tensor, labels: Tensor) -> Tensor:
        """x + xi crafted against ``labels`` (the predicted ones in training), clipped to the input range."""
        with attack_mode(self.network):
            if self.attack == "fgsm":
                return fgsm(self.network, x, labels, self.eps, bounds=self.input_bounds)
            return pgd(self.network, x, labels, self.eps, step=self.step, steps=self.steps, bounds=self.input_bounds)

    def defense_loss(self, x: Tensor, y: Tensor, batch_idx: int) -> DefenseOutput:
        x_adv = self.make_adversarial(x, self.predicted_labels(x))
        logits_clean = self.network(x)
        logits_adv = self.network(x_adv)
        ce_clean = F.cross_entropy(logits_clean.float(), y)
        ce_adv = F.cross_entropy(logits_adv.float(), y)
        loss = (1.0 - self.lam) * ce_clean + self.lam * ce_adv
        # lam goes to the log as a CPU tensor (no host-to-device copy per step, see defenses/nuat.py)
        parts = {"ce_clean": ce_clean, "ce_adv": ce_adv, "lam": torch.tensor(self.lam)}
        return DefenseOutput(loss, parts, logits_clean=logits_clean, logits_adv=logits_adv, x_adv=x_adv)
