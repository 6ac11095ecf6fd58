"""The official AutoAttack's own checks (fra31/auto-attack, ``autoattack/checks.py``), run inside our evaluation
with the official triggers. The official package prints warnings; here each check is a sanity verdict in the
results file and robustness.md, and a failed one is also a logged warning (docs/evaluation.md, "The official
AutoAttack checks").

Model checks, once per evaluation whose suite runs AutoAttack, on the evaluation's first batch, at most
``PROBE_EXAMPLES`` of it (the official ``x[:bs]``, bs = 250), in the evaluation's mode and precision
(:func:`probe`):

* randomized (settings of version ``standard`` only, as officially): over 5 forward passes the number of correct
  predictions changes, or two outputs normalized to unit L2 norm differ by more than 1e-4;
* range_output: every output is in (-1e-5, 1 + 1e-5) and every row sums to 1 within 1e-5, i.e. the network
  returns probabilities, which weaken the attacks' losses;
* dynamic: one forward pass calls a Python function named ``grad``, ``backward`` or ``_make_grads`` (counted with
  ``sys.settrace``): a defense that computes gradients at test time;
* n_classes: with APGD-DLR or APGD-T, at most 2 classes, or 3 (too few for the targeted DLR loss), or more target
  classes than n - 1. Our composition takes min(9, n - 1) targets and refuses ``standard`` below 4 classes before
  anything runs, so only ``rand`` with 3 classes can reach this verdict failed.

Stage checks, per AutoAttack setting of the suite, from the counts each batch's run hands in
(:mod:`advtrain.attacks.diagnostics`), summed over batches and DDP ranks:

* zero_gradients: points whose gradient at the start of APGD-T (``standard``) or APGD-DLR (``rand``) is exactly 0;
* square_sr: Square lowers the robust accuracy by more than 0.002 below the lowest accuracy before it, i.e.
  a gradient-free attack finds what the gradient attacks missed: a sign of masked gradients.
"""

from __future__ import annotations

import itertools
import sys
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from advtrain.attacks import stream_seed
from advtrain.attacks.autoattack import DLR_STAGES, STAGES, TARGET_CLASSES, VERSIONS

from .results import SettingResult, Verdict

if TYPE_CHECKING:
    from .engine import Run
    from .sanity import Measured

PROBE_EXAMPLES = 250
RANDOMIZED_PASSES, RANDOMIZED_ALPHA = 5, 1e-4
RANGE_ALPHA = 1e-5
SQUARE_ALPHA = 0.002
TRACED = ("grad", "backward", "_make_grads")
PROBE_STREAM = -2  # the probe's own seeded draws of a randomized network


def version_of(run: Run) -> str:
    return run.setting.version or VERSIONS[0]


def is_autoattack(run: Run) -> bool:
    return run.setting.attack == "autoattack"


def diagnostic_keys(runs: list[Run]) -> list[tuple[int, str, int]]:
    """(run index, count, length) for the counts each AutoAttack run's batches hand in."""
    return [key for i, run in enumerate(runs) if is_autoattack(run)
            for key in ((i, "clean_correct", 1), (i, "broken", len(STAGES[version_of(run)])), (i, "zero_gradient", 1))]


def batch_counts(index: int, run: Run, reports: list[dict]) -> dict[str, Tensor]:
    """One batch's counts for run ``index`` from AutoAttack's reports: clean points correct, points each stage
    broke, and points with zero gradient at the DLR stage."""
    stages = STAGES[version_of(run)]
    clean, broken, zero = 0, torch.zeros(len(stages), dtype=torch.int64), 0
    for report in reports:
        clean += report["clean_correct"]
        before = report["clean_correct"]
        for k, entry in enumerate(report["attacks"]):
            broken[k] += before - entry["robust_after"]
            before = entry["robust_after"]
            zero += entry.get("zero_gradient", 0)
    return {f"{index}:clean_correct": torch.tensor([clean]), f"{index}:broken": broken,
            f"{index}:zero_gradient": torch.tensor([zero])}


def stage_summary(run: Run, counts: dict[str, Tensor]) -> dict:
    """What a results file records of one AutoAttack run: the points correct at its clean check, the points
    robust after each stage and the points with zero gradient at its DLR stage."""
    clean = int(counts["clean_correct"][0])
    robust = clean - counts["broken"].cumsum(0)
    return {"clean_correct": clean, "robust_after": dict(zip(STAGES[version_of(run)], robust.tolist(), strict=True)),
            "zero_gradient": int(counts["zero_gradient"][0])}


def _calls_during(network: nn.Module, x: Tensor) -> dict[str, int]:
    """How often one forward pass calls each of :data:`TRACED` (the official ``check_dynamic``)."""
    counts = dict.fromkeys(TRACED, 0)

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name in counts:
            counts[frame.f_code.co_name] += 1

    previous = sys.gettrace()  # a debugger's or coverage's tracer is put back
    sys.settrace(tracer)
    try:
        network(x)
    finally:
        sys.settrace(previous)
    return counts


def probe(network: nn.Module, x: Tensor, y: Tensor, seed: int) -> dict:
    """The model checks' measurements on the first :data:`PROBE_EXAMPLES` of ``x`` (plain data). A randomized
    network's draws are seeded and leave the caller's generators where they were."""
    x, y = x[:PROBE_EXAMPLES], y[:PROBE_EXAMPLES]
    cuda = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        probe_seed = stream_seed(seed, PROBE_STREAM, 0)
        torch.random.default_generator.manual_seed(probe_seed)
        for device in cuda:  # this device only: fork_rng restores no other
            torch.cuda.default_generators[device.index or 0].manual_seed(probe_seed)
        with torch.no_grad():
            outputs = [network(x).float() for _ in range(RANDOMIZED_PASSES)]
        with torch.enable_grad():  # as the official check calls the model: a defense may take gradients
            calls = _calls_during(network, x)
    unit = [o / (o.norm(dim=1, keepdim=True) + 1e-10) for o in outputs]
    difference = max(float((a - b).norm(dim=1).max()) for a, b in itertools.combinations(unit, 2))
    logits = outputs[0]
    return {"examples": len(x), "correct_per_pass": [int((o.argmax(1) == y).sum()) for o in outputs],
            "max_output_difference": difference, "output_min": float(logits.min()),
            "output_max": float(logits.max()), "row_sum_max_error": float((logits.sum(1) - 1).abs().max()),
            "calls_in_forward": calls, "n_classes": logits.shape[1]}


def suite_probe(runs: list[Run], network: nn.Module, x: Tensor, y: Tensor, seed: int) -> dict | None:
    """:func:`probe` when the suite runs AutoAttack, else None (the model checks are AutoAttack's)."""
    if not any(is_autoattack(run) and run.role == "suite" for run in runs):
        return None
    return probe(network, x, y, seed)


# ---- the verdicts (each reads ``m.autoattack``: the probe and the versions of the suite's AutoAttack runs) ----
def _versions(m: Measured) -> set[str]:
    return {a.setting.get("version") or VERSIONS[0] for a in _autoattack_results(m)}


def _autoattack_results(m: Measured) -> list[SettingResult]:
    return [a for a in m.attacks if a.attack == "autoattack"]


def autoattack_randomized(m: Measured) -> list[Verdict]:
    if m.autoattack is None or "standard" not in _versions(m):
        return []
    p = m.autoattack
    fired = len(set(p["correct_per_pass"])) > 1 or p["max_output_difference"] > RANDOMIZED_ALPHA
    return [Verdict.of("autoattack_randomized", not fired,
                       f"correct predictions over {RANDOMIZED_PASSES} passes of {p['examples']} inputs: "
                       f"{p['correct_per_pass']}; largest difference of normalized outputs "
                       f"{p['max_output_difference']:.3g} (official threshold {RANDOMIZED_ALPHA:g})",
                       "a randomized network judged by AutoAttack standard's single forward passes: use version "
                       "rand (EOT over 20 draws), or leave version unset and advtrain picks it")]


def autoattack_range_output(m: Measured) -> list[Verdict]:
    if m.autoattack is None:
        return []
    p = m.autoattack
    fired = (p["output_max"] < 1 + RANGE_ALPHA and p["output_min"] > -RANGE_ALPHA
             and p["row_sum_max_error"] < RANGE_ALPHA)
    return [Verdict.of("autoattack_range_output", not fired,
                       f"outputs in [{p['output_min']:.4g}, {p['output_max']:.4g}], largest |row sum - 1| "
                       f"{p['row_sum_max_error']:.3g} (official threshold {RANGE_ALPHA:g})",
                       "the network returns probabilities, not logits: cross-entropy and DLR on probabilities "
                       "saturate and weaken the attacks; evaluate the logits")]


def autoattack_dynamic(m: Measured) -> list[Verdict]:
    if m.autoattack is None:
        return []
    calls = m.autoattack["calls_in_forward"]
    return [Verdict.of("autoattack_dynamic", not any(calls.values()),
                       "calls in one forward pass: " + ", ".join(f"{k} {v}" for k, v in calls.items()),
                       "a defense that computes gradients in its forward pass (test-time optimization or "
                       "adaptation): AutoAttack may not be enough; attack it adaptively")]


def autoattack_n_classes(m: Measured) -> list[Verdict]:
    if m.autoattack is None:
        return []
    n, stages = m.autoattack["n_classes"], {s for v in _versions(m) for s in STAGES[v]}
    targets = min(TARGET_CLASSES, n - 1)
    problems = []
    if stages & set(DLR_STAGES) and n <= 3:
        problems.append(f"with only {n} classes the {'DLR' if n <= 2 else 'targeted DLR'} loss cannot be used")
    if stages & {"apgd-t", "fab-t"} and targets + 1 > n:
        problems.append(f"more target classes ({targets}) than possible ({n - 1})")
    return [Verdict.of("autoattack_n_classes", not problems,
                       "; ".join(problems) or f"{n} classes, {targets} target classes",
                       "AutoAttack's DLR losses compare the largest logits: too few classes make them undefined")]


def autoattack_zero_gradients(m: Measured) -> list[Verdict]:
    verdicts = []
    for a in _autoattack_results(m):
        zero = (a.autoattack or {}).get("zero_gradient", 0)
        verdicts.append(Verdict.of(f"autoattack_zero_gradients[{a.name}]", zero == 0,
                                   f"{zero} points with zero gradient at the start of the DLR stage",
                                   "gradient masking (saturated or non-differentiable layers): gradient attacks "
                                   "cannot move these points; try a gradient-free or adaptive attack"))
    return verdicts


def autoattack_square_sr(m: Measured) -> list[Verdict]:
    verdicts = []
    for a in _autoattack_results(m):
        robust = (a.autoattack or {}).get("robust_after", {})
        if "square" not in robust:
            continue
        n = a.score.n
        before = list(robust.values())[list(robust).index("square") - 1]
        if before == 0:  # the official loop stops when no robust point is left: Square never ran
            continue
        gain = (before - robust["square"]) / max(n, 1)
        verdicts.append(Verdict.of(f"autoattack_square_sr[{a.name}]", gain <= SQUARE_ALPHA,
                                   f"Square broke {before - robust['square']} of {n} points that the gradient "
                                   f"attacks did not ({gain:.2%}; official threshold {SQUARE_ALPHA:.1%})",
                                   "masked gradients: a gradient-free attack succeeds where the gradient attacks "
                                   "fail; run Square with more queries and restarts, or an adaptive attack"))
    return verdicts


CHECKS = (autoattack_randomized, autoattack_range_output, autoattack_dynamic, autoattack_n_classes,
          autoattack_zero_gradients, autoattack_square_sr)

__all__ = ["CHECKS", "PROBE_EXAMPLES", "batch_counts", "diagnostic_keys", "is_autoattack", "probe", "stage_summary",
           "suite_probe"]
