"""Adversarial example generators: pure functions on tensors, on the model's device.

Every budget, step and clamp is in the input's natural range ([0, 1] images, [-1, 1] audio). The attack table
(:data:`ATTACKS`) lists every attack an evaluation can run; :class:`AttackSetting` is one configured entry.
"""

from .autoattack import AUTOATTACK_VERSION, autoattack, autoattack_run
from .budget import format_budget, parse_budget
from .core import bernoulli_start, project, projected_gradient, random_start
from .deepfool import deepfool
from .gama import gama_fw, gama_loss, gama_pgd
from .losses import cross_entropy, kl_from, margin, misclassified
from .metrics import METRICS
from .mode import attack_mode, is_randomized
from .noise import covariance_of, lrc, lrc_noise, uniform_noise
from .nuclear import nuclear_loss, nuclear_norm, nuclear_norm_step, nuclear_two_step
from .registry import ATTACKS, AttackSpec, Param, check_attack_name
from .setting import AttackSetting
from .standard import bim, bim_steps, fgsm, fgsm_rs, mim, pgd, rfgsm
from .streams import SEED_MIX, seeded_generator, stream_seed
from .surrogates import known_surrogates, register_surrogates, use_bpda, use_surrogate
from .targeted import bim_targeted, mim_targeted, pgd_targeted

__all__ = [
    "ATTACKS", "AUTOATTACK_VERSION", "METRICS", "AttackSetting", "AttackSpec", "Param", "attack_mode",
    "autoattack", "autoattack_run", "bernoulli_start", "bim", "bim_steps", "check_attack_name", "covariance_of",
    "cross_entropy", "deepfool", "fgsm", "fgsm_rs", "format_budget", "gama_fw", "gama_loss", "gama_pgd",
    "is_randomized", "kl_from", "known_surrogates", "lrc", "lrc_noise", "margin", "mim", "misclassified",
    "nuclear_loss", "nuclear_norm", "nuclear_norm_step", "nuclear_two_step", "parse_budget", "pgd",
    "pgd_targeted", "project", "projected_gradient", "random_start", "register_surrogates", "rfgsm",
    "uniform_noise", "use_bpda", "use_surrogate",
    "bim_targeted", "mim_targeted", "SEED_MIX", "seeded_generator", "stream_seed",
]
