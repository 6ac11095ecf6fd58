"""From per-example totals to the results of one evaluation: accuracies (mean, std and worst case over draws for
a randomized network), perturbation metrics, transfer rows and sanity verdicts."""

from __future__ import annotations

import math

from advtrain.attacks.metrics import METRICS

from .autoattack_checks import is_autoattack, stage_summary
from .engine import Run, Tally
from .results import Accuracy, EvaluationResults, SettingResult
from .sanity import sanity_verdicts


def setting_result(run: Run, index: int, tally: Tally, randomized: bool, precision: str = "32") -> SettingResult:
    """Run ``index``'s accuracy, cost and metrics; a transfer run's setting names its source."""
    setting = {**run.setting.as_dict(), "precision": precision}
    setting.pop("metrics", None)  # the names of its metrics: their values follow
    if run.transfer is not None:
        setting["surrogate"] = run.transfer.source
    metrics = {m: METRICS[m].summarize(tally.metrics[index, m]) for m in run.setting.spec.metrics}
    counts = {name: values for (i, name), values in tally.diagnostics.items() if i == index}
    return SettingResult(
        setting=setting, name=run.setting.name,
        score=Accuracy.of(tally.robust[index], tally.robust_per_draw[index], tally.draws),
        seconds=round(float(tally.seconds[index]), 3), role=run.role, metrics=metrics or None,
        single_draw_gradient=(setting["eot_samples"] == 1 and not setting["omniscient"]) if randomized else None,
        autoattack=stage_summary(run, counts) if is_autoattack(run) else None,
        robust_fraction=(tally.robust[index].double() / tally.draws).tolist())


def randomized_note(draws: int, attacks: list[SettingResult]) -> str:
    no_eot = [a.name for a in attacks if a.single_draw_gradient]
    return (f"randomized network: every accuracy is over {draws} forward passes (mean, std, worst = robust in every "
            "draw)." + (f" These settings attacked with single-draw gradients (no EOT), so they are upper bounds on "
                        f"robust accuracy: {', '.join(no_eot)}" if no_eot else
                        " Every attack averaged its gradients over draws (EOT)."))


def summarize(runs: list[Run], tally: Tally, randomized: bool, sanity_checks: bool,
              precision: str = "32", autoattack_probe: dict | None = None) -> EvaluationResults:
    """The results' measured part: clean accuracy, every run by its role, the sanity verdicts and the per-example
    outcomes (and a note for a randomized network). The caller adds what identifies the run.
    ``autoattack_probe``: the official AutoAttack model checks' measurements (:func:`.autoattack_checks.probe`)."""
    draws = tally.draws
    entries = [setting_result(run, i, tally, randomized, precision) for i, run in enumerate(runs)]
    by_role = {role: [e for e in entries if e.role == role] for role in ("suite", "transfer", "sanity")}
    attacks, transfer, sanity_runs = by_role["suite"], by_role["transfer"], by_role["sanity"]
    for t, run in zip(transfer, [r for r in runs if r.role == "transfer"], strict=True):
        white_box = attacks[run.transfer.white_box_index]  # a transfer row is named after the setting it repeats
        t.name, t.white_box_accuracy = f"transfer[{run.transfer.label}] {white_box.name}", white_box.accuracy
    clean = Accuracy.of(tally.clean, tally.clean_per_draw, draws)
    verdicts = []
    if sanity_checks:
        noise = 2 * math.sqrt(0.25 / max(tally.n * draws, 1)) if randomized else 0.0
        eps_zero, large_eps = (r.accuracy for r in sanity_runs)
        verdicts = sanity_verdicts(clean.accuracy, attacks, eps_zero, large_eps, tolerance=0.005 + noise,
                                   transfer=transfer, autoattack=autoattack_probe)
    suite_index = [i for i, run in enumerate(runs) if run.role == "suite"]
    per_example_metrics = {entries[i].name: {m: tally.metrics[i, m].tolist() for m in runs[i].setting.spec.metrics}
                           for i in suite_index if runs[i].setting.spec.metrics}
    return EvaluationResults(
        n=tally.n, randomized=randomized, draws=draws, precision=precision, clean=clean, attacks=attacks,
        transfer=transfer,
        sanity_runs=sanity_runs, verdicts=verdicts,
        per_example={"clean": tally.clean.tolist(), **{entries[i].name: tally.robust[i].tolist() for i in suite_index}},
        per_example_metrics=per_example_metrics or None,
        note=randomized_note(draws, attacks) if randomized else None)
