"""Cheap sanity checks of an evaluation (Carlini et al., "On Evaluating Adversarial Robustness", 2019).

Each check reads the accuracies an evaluation measured and returns a verdict; a failed check names the
likely cause. None of them proves robustness; each failure is a sign that a number is not trustworthy.
"""

from __future__ import annotations

import math
from collections import defaultdict

from advtrain.attacks import ATTACKS

LARGE_EPS = 0.5  # in [0, 1] images: any image can be turned into mid-grey, so accuracy should be ~0
NEAR_ZERO = 0.10


def _verdict(check: str, passed: bool, detail: str, cause: str) -> dict:
    return {"check": check, "passed": bool(passed), "detail": detail, "likely_cause": None if passed else cause}


def _kind(a: dict) -> str | None:
    spec = ATTACKS.get(a["attack"])
    return None if spec is None else spec.kind


def _variant(a: dict) -> tuple:
    """What besides attack, budget and steps makes two settings different threat models or attacks (EOT draws,
    the omniscient attacker, a surrogate or BPDA, the attack's own parameters such as LRC's decay length): only
    settings of one variant are compared."""
    spec = ATTACKS.get(a["attack"])
    own = tuple((name, repr(a.get(name))) for name in (spec.params if spec else ()))
    return a.get("eot_samples", 1), a.get("omniscient", False), a.get("surrogate"), a.get("bpda", False), own


def paired_noise(a: dict, b: dict) -> float:
    """Two standard errors of the accuracy difference of two settings evaluated on the same examples.

    With per-example robust fractions p (``a["robust_fraction"]``, one per example: 0/1, or the fraction of
    draws for a randomized model), accuracy(a) - accuracy(b) = mean(p_a - p_b); when the two attacks are equally
    strong its standard error is sqrt(sum (p_a - p_b)^2) / n (McNemar's test for 0/1 outcomes: only the
    examples on which they disagree count). Zero when either entry has no per-example data.
    """
    pa, pb = a.get("robust_fraction"), b.get("robust_fraction")
    if pa is None or pb is None or len(pa) != len(pb) or not pa:
        return 0.0
    return 2 * math.sqrt(sum((x - y) ** 2 for x, y in zip(pa, pb, strict=True))) / len(pa)


def sanity_verdicts(clean: float, attacks: list[dict], eps_zero: float | None, large_eps: float | None,
                    tolerance: float = 0.005, transfer: list[dict] | None = None) -> list[dict]:
    """Verdicts for one evaluation.

    Args:
        clean: clean accuracy.
        attacks: entries with ``attack, eps, steps, restarts, norm, accuracy``.
        eps_zero: accuracy under PGD with eps = 0 (None: not measured).
        large_eps: accuracy under PGD at eps = 0.5 (None: not measured).
        tolerance: slack for sampling noise (randomized models) and random starts; comparisons of two attack
            entries that carry ``robust_fraction`` (per example) add :func:`paired_noise`, so small evaluations
            do not flag the seed-to-seed noise of two equally strong attacks.
        transfer: entries ``{name, eps, accuracy, white_box_accuracy}`` of transfer attacks.
    """
    verdicts = []
    if eps_zero is not None:
        verdicts.append(_verdict(
            "eps0_equals_clean", abs(eps_zero - clean) <= tolerance,
            f"accuracy at eps 0: {eps_zero:.4f}, clean: {clean:.4f}",
            "the prediction changes without a perturbation: a randomized model evaluated by single forward "
            "passes, or inputs not in the range the attack assumes"))
    if large_eps is not None:
        verdicts.append(_verdict(
            "large_eps_near_zero", large_eps <= NEAR_ZERO,
            f"accuracy under PGD at eps {LARGE_EPS} of the input range: {large_eps:.4f} (expected <= {NEAR_ZERO})",
            "gradient masking (zero, shattered or randomized gradients) or a wrong input range: an "
            "unbounded-looking budget should break every model"))

    attacks = [a for a in attacks if a.get("eps") is not None]  # budget-free attacks (DeepFool) have no eps axis
    families = defaultdict(list)
    for a in attacks:
        # a step-count rule (Kurakin's: more steps at larger eps) is one family across budgets
        families[(a["attack"], a.get("steps_rule") or a["steps"], a["restarts"], a["norm"], _variant(a))].append(a)
    rising = []
    for (attack, steps, restarts, _, _), runs in families.items():
        runs = sorted(runs, key=lambda a: a["eps"])
        for small, large in zip(runs, runs[1:]):
            if large["accuracy"] > small["accuracy"] + tolerance + paired_noise(small, large):
                rising.append(f"{attack}-{steps}x{restarts}: {small['accuracy']:.4f} at eps {small['eps']:.4g} -> "
                              f"{large['accuracy']:.4f} at eps {large['eps']:.4g}")
    verdicts.append(_verdict(
        "monotone_in_eps", not rising, "; ".join(rising) or "accuracy never rises with eps",
        "gradient masking or too few steps at the larger budgets"))

    weaker = []
    by_eps = defaultdict(list)
    for a in attacks:
        by_eps[(round(a["eps"], 8), a["norm"])].append(a)
    for (eps, _), runs in by_eps.items():
        single = [a for a in runs if _kind(a) == "single_step"]
        iterative = [a for a in runs if _kind(a) == "iterative"]
        if single and iterative:
            best_single = min(single, key=lambda a: a["accuracy"])
            best_iterative = min(iterative, key=lambda a: a["accuracy"])
            if best_iterative["accuracy"] > best_single["accuracy"] + tolerance + paired_noise(best_single,
                                                                                               best_iterative):
                weaker.append(f"eps {eps:.4g}: best iterative {best_iterative['accuracy']:.4f} > single-step "
                              f"{best_single['accuracy']:.4f}")
    verdicts.append(_verdict(
        "iterative_beats_single_step", not weaker, "; ".join(weaker) or "iterative attacks at least as strong",
        "gradient masking, or an iterative attack with too small a step or too few steps"))

    regress = []
    by_attack = defaultdict(list)
    for a in attacks:
        by_attack[(a["attack"], round(a["eps"], 8), a["norm"], _variant(a))].append(a)
    for (attack, eps, _, _), runs in by_attack.items():
        runs = sorted(runs, key=lambda a: (a["steps"] * a["restarts"], a["steps"]))
        for fewer, more in zip(runs, runs[1:]):
            if more["accuracy"] > fewer["accuracy"] + tolerance + paired_noise(fewer, more):
                regress.append(f"{attack} eps {eps:.4g}: {fewer['steps']}x{fewer['restarts']} -> "
                               f"{more['steps']}x{more['restarts']} raised accuracy "
                               f"{fewer['accuracy']:.4f} -> {more['accuracy']:.4f}")
    verdicts.append(_verdict(
        "more_iterations_not_weaker", not regress, "; ".join(regress) or "more steps/restarts never helped the model",
        "randomness in the model or the attack (evaluate with more draws / EOT), or a step size that does "
        "not fit the number of steps"))

    for t in transfer or []:
        verdicts.append(_verdict(
            f"transfer_not_stronger[{t['name']}]", t["accuracy"] >= t["white_box_accuracy"] - tolerance,
            f"transfer {t['accuracy']:.4f} vs white-box {t['white_box_accuracy']:.4f}",
            "gradient masking: examples made on a surrogate fool the model more than its own gradients do"))
    return verdicts
