"""Evaluation results as files and scalars: ``<name>.json`` (everything), ``<name>.md`` (the table and the sanity
verdicts) and TensorBoard scalars ``robustness/<setting>`` (plus ``robustness/<setting>/<metric>``)."""

from __future__ import annotations

import json
from pathlib import Path

METRIC_LABELS = {"rho": "rho", "l2_median": "median L2"}


def _cell(entry: dict, randomized: bool) -> str:
    text = f"{100 * entry['accuracy']:.2f}"
    return text + (f" ± {100 * entry['accuracy_std']:.2f} (worst {100 * entry['accuracy_worst']:.2f})"
                   if randomized else "")


def metrics_text(entry: dict) -> str:
    """``rho 0.0123, median L2 0.456`` for an entry with perturbation metrics, else empty."""
    return ", ".join(f"{METRIC_LABELS.get(name, name)} {value:.4g}" for name, value in entry.get("metrics", {}).items())


def markdown_table(results: dict) -> str:
    """The accuracy table (a ``perturbation`` column when an attack reports sizes), then the note if any."""
    randomized = results["randomized"]
    rows = results["attacks"] + results["transfer"]
    sizes = any("metrics" in a for a in rows)
    extra = (" perturbation |", "---|") if sizes else ("", "")
    lines = [f"| setting | accuracy | correct / n |{extra[0]}", f"|---|---|---|{extra[1]}",
             f"| clean | {_cell(results['clean'], randomized)} | {results['clean']['correct']} / {results['n']} |"
             + (" |" if sizes else "")]
    for a in rows:
        lines.append(f"| {a['name']}{' (no EOT)' if a.get('single_draw_gradient') else ''} | {_cell(a, randomized)} | "
                     f"{a['correct']} / {a['n']} |" + (f" {metrics_text(a)} |" if sizes else ""))
    return "\n".join(lines) + (f"\n\n{results['note']}" if "note" in results else "")


def sanity_text(results: dict) -> str:
    return "\n".join(f"- {'ok' if v['passed'] else 'FAILED'}: {v['check']}: {v['detail']}"
                     for v in results["sanity"]["verdicts"])


def write_results(results: dict, out_dir: Path, filename: str) -> Path:
    """Write ``<filename>.json`` and ``<filename>.md`` into ``out_dir``; return the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{filename}.json"
    path.write_text(json.dumps(results, indent=1))
    checks = sanity_text(results)
    (out_dir / f"{filename}.md").write_text(markdown_table(results) + "\n" +
                                            (f"\nSanity checks:\n{checks}\n" if checks else ""))
    return path


def scalars(results: dict) -> dict[str, float]:
    """TensorBoard scalars: clean and per-setting accuracy, and each perturbation metric."""
    metrics = {"robustness/clean": results["clean"]["accuracy"]}
    for a in results["attacks"]:
        metrics[f"robustness/{a['name']}"] = a["accuracy"]
        metrics.update({f"robustness/{a['name']}/{m}": v for m, v in a.get("metrics", {}).items()})
    return metrics
