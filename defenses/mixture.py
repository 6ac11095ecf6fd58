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

from advtrain.attacks import AttackSetting, attack_mode

from .base import AdversarialDefense
from .outputs import DefenseOutput


class MixtureAT(AdversarialDefense):
    """(1 - lam) CE(f(x), y) + lam CE(f(x + xi), y), xi crafted on the predicted label (SGR paper, eq. 3).

    Args:
        network: the classifier.
        lam: weight of the adversarial term, in [0, 1]; default 0.5 (Kurakin et al.'s and R+FGSM's even mix; the
            SGR paper's value is lost, docs/methods.md).
        attack: the attack that crafts xi, a setting of the attack table (any row that trains): ``{attack: fgsm}``
            (the default, FGSM-aug: one signed step of eps from x) or ``{attack: pgd, steps: 10}`` (PGD-aug:
            uniform random start, signed steps of 2.5 eps / steps by default), with the budget ``eps`` of the base
            class unless it sets one.
        **kwargs: the base class's arguments (optimizer, lr_scheduler, eps, validation settings).

    The predicted label and the adversarial examples are computed with the network in eval mode
    (``advtrain.attacks.attack_mode``: BatchNorm running statistics, no dropout), our standard for crafting; the label
    is
    therefore the one the crafting network assigns, from one extra no-grad forward (our choice: the paper does not
    say which mode predicts). The two training forwards (clean, adversarial) are separate, in train mode.
    Logged parts: ``ce_clean``, ``ce_adv``, ``lam``.
    """

    def __init__(self, network: nn.Module, lam: float = 0.5, attack: dict | str | None = None, **kwargs):
        super().__init__(network, **kwargs)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be a number in [0, 1] (the adversarial term's weight), got {lam!r}")
        self.lam = float(lam)
        self.attack = AttackSetting.from_config(attack, self.eps, "MixtureAT attack", default={"attack": "fgsm"}
                                                ).check_training((), "MixtureAT")

    def predicted_labels(self, x: Tensor) -> Tensor:
        """argmax f(x) in the crafting mode; stays on the device (no sync)."""
        with torch.no_grad(), attack_mode(self.network):
            return self.network(x).argmax(1)

    def make_adversarial(self, x: Tensor, labels: Tensor) -> Tensor:
        """x + xi crafted against ``labels`` (the predicted ones in training), clipped to the input range."""
        with attack_mode(self.network):
            return self.attack.run(self.network, x, labels, bounds=self.input_bounds)

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
