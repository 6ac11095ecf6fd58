"""Evaluation results as files and scalars: ``<name>.json`` (everything), ``<name>.md`` (the table and the sanity
verdicts) and TensorBoard scalars ``robustness/<setting>`` (plus ``robustness/<setting>/<metric>``)."""

from __future__ import annotations

import json
from pathlib import Path

from .results import Accuracy, EvaluationResults, SettingResult

METRIC_LABELS = {"rho": "rho", "l2_median": "median L2"}


def _cell(score: Accuracy, randomized: bool) -> str:
    text = f"{100 * score.accuracy:.2f}"
    return text + (f" ± {100 * score.accuracy_std:.2f} (worst {100 * score.accuracy_worst:.2f})"
                   if randomized else "")


def metrics_text(entry: SettingResult) -> str:
    """``rho 0.0123, median L2 0.456`` for an entry with perturbation metrics, else empty."""
    return ", ".join(f"{METRIC_LABELS.get(name, name)} {value:.4g}" for name, value in (entry.metrics or {}).items())


def markdown_table(results: EvaluationResults) -> str:
    """The accuracy table (a ``perturbation`` column when an attack reports sizes), then the note if any."""
    randomized = results.randomized
    rows = results.attacks + results.transfer
    sizes = any(a.metrics for a in rows)
    extra = (" perturbation |", "---|") if sizes else ("", "")
    lines = [f"| setting | accuracy | correct / n |{extra[0]}", f"|---|---|---|{extra[1]}",
             f"| clean | {_cell(results.clean, randomized)} | {results.clean.correct} / {results.n} |"
             + (" |" if sizes else "")]
    for a in rows:
        lines.append(f"| {a.name}{' (no EOT)' if a.single_draw_gradient else ''} | {_cell(a.score, randomized)} | "
                     f"{a.score.correct} / {a.score.n} |" + (f" {metrics_text(a)} |" if sizes else ""))
    precision = ("Every setting ran in float32." if results.precision == "32" else
                 f"Every setting ran in {results.precision} (not float32): attacks may be weaker than in float32.")
    return "\n".join(lines) + f"\n\n{precision}" + (f"\n\n{results.note}" if results.note is not None else "")


def sanity_text(results: EvaluationResults) -> str:
    return "\n".join(f"- {'ok' if v.passed else 'FAILED'}: {v.check}: {v.detail}" for v in results.verdicts)


def free_stem(out_dir: Path, stem: str, fingerprint: str | None) -> str:
    """``<stem>[-k]``: the first name whose JSON is free or holds this very evaluation (same ``fingerprint``), so
    results are never replaced by another evaluation's."""
    path, k = out_dir / f"{stem}.json", 1
    while path.exists():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = {}
        if earlier.get("fingerprint") == fingerprint:
            print(f"Robustness: replacing {path}, the results of this same evaluation (same weights, suite, seed "
                  "and data)")
            break
        k += 1
        path = out_dir / f"{stem}-{k}.json"
    return path.stem


def write_results(results: EvaluationResults, out_dir: Path, filename: str) -> Path:
    """Write ``<filename>.json`` and ``<filename>.md`` into ``out_dir``; return the JSON path (also kept in
    ``results.path``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{filename}.json"
    path.write_text(json.dumps(results.to_dict(), indent=1))
    checks = sanity_text(results)
    (out_dir / f"{filename}.md").write_text(markdown_table(results) + "\n" +
                                            (f"\nSanity checks:\n{checks}\n" if checks else ""))
    results.path = path
    return path


def scalars(results: EvaluationResults) -> dict[str, float]:
    """TensorBoard scalars: clean and per-setting accuracy, and each perturbation metric."""
    metrics = {"robustness/clean": results.clean.accuracy}
    for a in results.attacks:
        metrics[f"robustness/{a.name}"] = a.accuracy
        metrics.update({f"robustness/{a.name}/{m}": v for m, v in (a.metrics or {}).items()})
    return metrics
