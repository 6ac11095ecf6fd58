"""Cheap sanity checks of an evaluation (Carlini et al., "On Evaluating Adversarial Robustness", 2019).

Each check is one function in :data:`CHECKS` (the official AutoAttack's own checks among them:
:mod:`.autoattack_checks`): it reads what the evaluation measured (:class:`Measured`) and returns
its verdicts; a failed check names the likely cause. None of them proves robustness; each failure is a sign that a
number is not trustworthy. Adding a check is one function and one entry in the table.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from advtrain.attacks import ATTACKS

from . import autoattack_checks
from .results import SettingResult, Verdict

LARGE_EPS = 0.5  # in [0, 1] images: any image can be turned into mid-grey, so accuracy should be ~0
NEAR_ZERO = 0.10


@dataclass
class Measured:
    """What the checks read.

    Args:
        clean: clean accuracy.
        attacks: the suite's settings (their ``robust_fraction`` per example gives the paired noise).
        eps_zero: accuracy under PGD with eps = 0 (None: not measured).
        large_eps: accuracy under PGD at eps = 0.5 of the input range (None: not measured).
        tolerance: slack for sampling noise (randomized models) and random starts.
        transfer: the transfer rows (each with its ``white_box_accuracy``).
        autoattack: the official AutoAttack model checks' measurements (None: no AutoAttack in the suite).
    """

    clean: float
    attacks: list[SettingResult]
    eps_zero: float | None = None
    large_eps: float | None = None
    tolerance: float = 0.005
    transfer: list[SettingResult] = field(default_factory=list)
    autoattack: dict | None = None

    @property
    def budgeted(self) -> list[SettingResult]:
        """The suite's settings with a budget (budget-free attacks such as DeepFool have no eps axis)."""
        return [a for a in self.attacks if a.eps is not None]

    def worse(self, a: SettingResult, b: SettingResult) -> bool:
        """Whether ``b`` left more examples robust than ``a`` beyond the tolerance and their paired noise."""
        return b.accuracy > a.accuracy + self.tolerance + paired_noise(a, b)


def _kind(a: SettingResult) -> str | None:
    spec = ATTACKS.get(a.attack)
    return None if spec is None else spec.kind


def _variant(a: SettingResult) -> tuple:
    """What besides attack, budget and steps makes two settings different threat models or attacks (EOT draws,
    the omniscient attacker, a surrogate or BPDA, the attack's own parameters such as LRC's decay length): only
    settings of one variant are compared."""
    s = a.setting
    spec = ATTACKS.get(a.attack)
    own = tuple((name, repr(s.get(name))) for name in (spec.params if spec else ()))
    return s.get("eot_samples", 1), s.get("omniscient", False), s.get("surrogate"), s.get("bpda", False), own


def paired_noise(a: SettingResult, b: SettingResult) -> float:
    """Two standard errors of the accuracy difference of two settings evaluated on the same examples.

    With per-example robust fractions p (``a.robust_fraction``, one per example: 0/1, or the fraction of
    draws for a randomized model), accuracy(a) - accuracy(b) = mean(p_a - p_b); when the two attacks are equally
    strong its standard error is sqrt(sum (p_a - p_b)^2) / n (McNemar's test for 0/1 outcomes: only the
    examples on which they disagree count). Zero when either entry has no per-example data.
    """
    pa, pb = a.robust_fraction, b.robust_fraction
    if pa is None or pb is None or len(pa) != len(pb) or not pa:
        return 0.0
    return 2 * math.sqrt(sum((x - y) ** 2 for x, y in zip(pa, pb, strict=True))) / len(pa)


def eps0_equals_clean(m: Measured) -> list[Verdict]:
    if m.eps_zero is None:
        return []
    return [Verdict.of("eps0_equals_clean", abs(m.eps_zero - m.clean) <= m.tolerance,
                       f"accuracy at eps 0: {m.eps_zero:.4f}, clean: {m.clean:.4f}",
                       "the prediction changes without a perturbation: a randomized model evaluated by single forward "
                       "passes, or inputs not in the range the attack assumes")]


def large_eps_near_zero(m: Measured) -> list[Verdict]:
    if m.large_eps is None:
        return []
    return [Verdict.of("large_eps_near_zero", m.large_eps <= NEAR_ZERO,
                       f"accuracy under PGD at eps {LARGE_EPS} of the input range: {m.large_eps:.4f} "
                       f"(expected <= {NEAR_ZERO})",
                       "gradient masking (zero, shattered or randomized gradients) or a wrong input range: an "
                       "unbounded-looking budget should break every model")]


def monotone_in_eps(m: Measured) -> list[Verdict]:
    families = defaultdict(list)
    for a in m.budgeted:
        # a step-count rule (Kurakin's: more steps at larger eps) is one family across budgets
        s = a.setting
        families[(a.attack, s.get("steps_rule") or s["steps"], s["restarts"], s["norm"], _variant(a))].append(a)
    rising = []
    for (attack, steps, restarts, _, _), runs in families.items():
        runs = sorted(runs, key=lambda a: a.eps)
        rising += [f"{attack}-{steps}x{restarts}: {small.accuracy:.4f} at eps {small.eps:.4g} -> "
                   f"{large.accuracy:.4f} at eps {large.eps:.4g}"
                   for small, large in zip(runs, runs[1:]) if m.worse(small, large)]
    return [Verdict.of("monotone_in_eps", not rising, "; ".join(rising) or "accuracy never rises with eps",
                       "gradient masking or too few steps at the larger budgets")]


def iterative_beats_single_step(m: Measured) -> list[Verdict]:
    by_eps = defaultdict(list)
    for a in m.budgeted:
        by_eps[(round(a.eps, 8), a.setting["norm"])].append(a)
    weaker = []
    for (eps, _), runs in by_eps.items():
        single = [a for a in runs if _kind(a) == "single_step"]
        iterative = [a for a in runs if _kind(a) == "iterative"]
        if single and iterative:
            best_single = min(single, key=lambda a: a.accuracy)
            best_iterative = min(iterative, key=lambda a: a.accuracy)
            if m.worse(best_single, best_iterative):
                weaker.append(f"eps {eps:.4g}: best iterative {best_iterative.accuracy:.4f} > single-step "
                              f"{best_single.accuracy:.4f}")
    return [Verdict.of("iterative_beats_single_step", not weaker,
                       "; ".join(weaker) or "iterative attacks at least as strong",
                       "gradient masking, or an iterative attack with too small a step or too few steps")]


def more_iterations_not_weaker(m: Measured) -> list[Verdict]:
    by_attack = defaultdict(list)
    for a in m.budgeted:
        by_attack[(a.attack, round(a.eps, 8), a.setting["norm"], _variant(a))].append(a)
    regress = []
    for (attack, eps, _, _), runs in by_attack.items():
        runs = sorted(runs, key=lambda a: (a.setting["steps"] * a.setting["restarts"], a.setting["steps"]))
        regress += [f"{attack} eps {eps:.4g}: {fewer.setting['steps']}x{fewer.setting['restarts']} -> "
                    f"{more.setting['steps']}x{more.setting['restarts']} raised accuracy {fewer.accuracy:.4f} -> "
                    f"{more.accuracy:.4f}" for fewer, more in zip(runs, runs[1:]) if m.worse(fewer, more)]
    return [Verdict.of("more_iterations_not_weaker", not regress,
                       "; ".join(regress) or "more steps/restarts never helped the model",
                       "randomness in the model or the attack (evaluate with more draws / EOT), or a step size that "
                       "does not fit the number of steps")]


def transfer_not_stronger(m: Measured) -> list[Verdict]:
    return [Verdict.of(f"transfer_not_stronger[{t.name}]", t.accuracy >= t.white_box_accuracy - m.tolerance,
                       f"transfer {t.accuracy:.4f} vs white-box {t.white_box_accuracy:.4f}",
                       "gradient masking: examples made on a surrogate fool the model more than its own gradients do")
            for t in m.transfer]


CHECKS: tuple[Callable[[Measured], list[Verdict]], ...] = (
    eps0_equals_clean, large_eps_near_zero, monotone_in_eps, iterative_beats_single_step, more_iterations_not_weaker,
    transfer_not_stronger, *autoattack_checks.CHECKS)


def sanity_verdicts(clean: float, attacks: list[SettingResult], eps_zero: float | None, large_eps: float | None,
                    tolerance: float = 0.005, transfer: list[SettingResult] | None = None,
                    autoattack: dict | None = None) -> list[Verdict]:
    """Every check of :data:`CHECKS` on what one evaluation measured (see :class:`Measured`)."""
    measured = Measured(clean, attacks, eps_zero, large_eps, tolerance, list(transfer or []), autoattack)
    return [verdict for check in CHECKS for verdict in check(measured)]
