"""From per-example totals to the results of one evaluation: accuracies (mean, std and worst case over draws for
a randomized network), perturbation metrics, transfer rows and sanity verdicts."""

from __future__ import annotations

import math

from torch import Tensor

from advtrain.attacks.metrics import METRICS

from .engine import Run, Tally, TransferSource
from .sanity import sanity_verdicts


def accuracy_summary(per_example: Tensor, per_draw: Tensor, draws: int) -> dict:
    """``per_example``: draws survived per example; ``per_draw``: examples correct per draw."""
    n = max(len(per_example), 1)
    per_draw_acc = per_draw.double() / n
    return {"correct": int((per_example == draws).sum()), "n": len(per_example),
            "accuracy": float(per_draw_acc.mean()),
            "accuracy_std": float(per_draw_acc.std()) if draws > 1 else 0.0,
            "accuracy_worst": float((per_example == draws).double().sum() / n)}


def summarize(runs: list[Run], transfer_sources: list[TransferSource], n_suite: int, tally: Tally,
              randomized: bool, sanity_checks: bool) -> dict:
    """The results' accuracy part: ``clean``, ``attacks`` (the suite), ``transfer``, ``sanity`` and the
    per-example outcomes (and ``note`` for a randomized network). The caller adds what identifies the run."""
    draws = tally.draws
    entries = []
    for i, (run, robust, per_draw, seconds) in enumerate(zip(runs, tally.robust, tally.robust_per_draw,
                                                               tally.seconds, strict=True)):
        entry = {**run.setting.as_dict(), "name": run.setting.name, **accuracy_summary(robust, per_draw, draws),
                 "seconds": round(float(seconds), 3)}
        if run.setting.spec.metrics:
            entry["metrics"] = {m: METRICS[m].summarize(tally.metrics[i, m]) for m in run.setting.spec.metrics}
        entries.append(entry)
    if randomized:
        for e in entries:
            e["single_draw_gradient"] = e["eot_samples"] == 1 and not e["omniscient"]
    n_transfer = len(transfer_sources)
    attacks = entries[:n_suite]
    transfer = entries[n_suite:n_suite + n_transfer]
    sanity_runs = entries[n_suite + n_transfer:]
    for t, (source, label, j) in zip(transfer, transfer_sources, strict=True):
        t.update(surrogate=source, name=f"transfer[{label}] {attacks[j]['name']}",
                 white_box_accuracy=attacks[j]["accuracy"])
    clean = accuracy_summary(tally.clean, tally.clean_per_draw, draws)
    n = tally.n
    verdicts = []
    if sanity_checks:
        noise = 2 * math.sqrt(0.25 / max(n * draws, 1)) if randomized else 0.0
        fractions = [{**a, "robust_fraction": (r.double() / draws).tolist()} for a, r in zip(attacks, tally.robust)]
        verdicts = sanity_verdicts(clean["accuracy"], fractions, sanity_runs[0]["accuracy"],
                                   sanity_runs[1]["accuracy"], tolerance=0.005 + noise, transfer=transfer)
    results = {"n": n, "randomized": randomized, "draws": draws, "clean": clean, "attacks": attacks,
               "transfer": transfer, "sanity": {"runs": sanity_runs, "verdicts": verdicts},
               "per_example": {"clean": tally.clean.tolist(),
                               **{a["name"]: r.tolist() for a, r in zip(attacks, tally.robust)}}}
    measured = {attacks[i]["name"]: {} for i, _ in tally.metric_keys if i < n_suite}
    for (i, m), values in tally.metrics.items():
        if i < n_suite:
            measured[attacks[i]["name"]][m] = values.tolist()
    if measured:
        results["per_example_metrics"] = measured
    if randomized:
        no_eot = [a["name"] for a in attacks if a["single_draw_gradient"]]
        results["note"] = (f"randomized network: every accuracy is over {draws} forward passes (mean, std, "
                           "worst = robust in every draw)." +
                           (f" These settings attacked with single-draw gradients (no EOT), so they are upper "
                            f"bounds on robust accuracy: {', '.join(no_eot)}" if no_eot else
                            " Every attack averaged its gradients over draws (EOT)."))
    return results
