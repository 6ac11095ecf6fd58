"""Adversarial example generators: pure functions on tensors, on the model's device.

Every budget, step and clamp is in the input's natural range ([0, 1] images, [-1, 1] audio).
"""

from .autoattack import AUTOATTACK_VERSION, autoattack, autoattack_run
from .budget import format_budget, parse_budget
from .core import bernoulli_start, project, projected_gradient, random_start
from .gama import gama_fw, gama_loss, gama_pgd
from .losses import cross_entropy, kl_from, margin, misclassified
from .mode import attack_mode
from .nuclear import nuclear_loss, nuclear_norm, nuclear_norm_step, nuclear_two_step
from .registry import ATTACKS, AttackSetting, check_attack_name
from .standard import bim, bim_steps, fgsm, fgsm_rs, mim, pgd

__all__ = [
    "ATTACKS", "AUTOATTACK_VERSION", "AttackSetting", "attack_mode", "autoattack", "autoattack_run",
    "bernoulli_start", "bim", "bim_steps", "check_attack_name", "cross_entropy", "fgsm", "fgsm_rs", "format_budget",
    "gama_fw", "gama_loss", "gama_pgd", "kl_from", "margin", "mim", "misclassified", "nuclear_loss", "nuclear_norm",
    "nuclear_norm_step", "nuclear_two_step", "parse_budget", "pgd", "project", "projected_gradient", "random_start",
]
