"""``make demo``: standard training, PGD adversarial training and NuAT-WA of a small CNN on
scikit-learn's bundled 8x8 digits, each evaluated under FGSM, PGD and AutoAttack at a few budgets; prints one
table. Then a tensorized (randomized Tucker, theta 0.9) CNN, evaluated over 10 draws with single-draw PGD, EOT
PGD and the omniscient attacker; prints a second table (mean ± std over draws).

Everything goes through the same CLI a user runs (``advtrain fit`` / ``advtrain test``), so the run
directories under ``runs/demo/`` hold the TensorBoard events, checkpoints and ``robustness.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from advtrain.cli import AdvtrainCLI
from callbacks import RobustnessEvaluation

DEMOS = {"Standard": "configs/demo/standard.yaml", "PGD-AT": "configs/demo/pgd_at.yaml",
         "NuAT-WA": "configs/demo/nuat.yaml"}
TENSORIZED = "configs/demo/tensorized.yaml"


def run(name: str, config: str, quiet_args: list[str]) -> dict:
    if not Path(config).exists():
        raise SystemExit(f"{config} not found: run `make demo` from the repository root")
    t0 = time.time()
    fit = AdvtrainCLI(args=["fit", "-c", config, *quiet_args])
    best = fit.trainer.checkpoint_callback.best_model_path
    test = AdvtrainCLI(args=["test", "-c", config, "--ckpt_path", best, *quiet_args])
    results = next(cb.results for cb in test.trainer.callbacks if isinstance(cb, RobustnessEvaluation))
    results["run_dir"] = test.trainer.log_dir
    results["seconds"] = time.time() - t0
    return results


def table(all_results: dict[str, dict]) -> str:
    names = [a["name"] for a in next(iter(all_results.values()))["attacks"]]
    header = "| defense | clean | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 2)]
    for defense, res in all_results.items():
        cells = [f"{100 * res['clean']['accuracy']:.1f}"] + [f"{100 * a['accuracy']:.1f}" for a in res["attacks"]]
        lines.append(f"| {defense} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def randomized_table(res: dict) -> str:
    """Rows: budgets; columns: clean, single-draw PGD, EOT PGD, omniscient PGD (mean ± std over draws)."""
    def cell(a):
        return f"{100 * a['accuracy']:.1f} ± {100 * a['accuracy_std']:.1f}"

    pgd = [a for a in res["attacks"] if a["attack"] == "pgd"]
    lines = ["| eps | clean | PGD-20 (no EOT) | PGD-20 EOT-10 | PGD-20 omniscient |", "|---|---|---|---|---|"]
    for eps in sorted({a["eps_label"] for a in pgd}, key=float):
        at = {(a["eot_samples"] > 1, a["omniscient"]): a for a in pgd if a["eps_label"] == eps}
        lines.append(f"| {eps} | {cell(res['clean'])} | {cell(at[False, False])} | {cell(at[True, False])} | "
                     f"{cell(at[False, True])} |")
    return "\n".join(lines)


def main():
    quiet = ["--trainer.enable_progress_bar", "false"]
    all_results = {name: run(name, cfg, quiet) for name, cfg in DEMOS.items()}
    n = next(iter(all_results.values()))["n"]
    print(f"\nDigits test set (n={n}); accuracy in %; robust = correct both clean and attacked:\n")
    print(table(all_results))
    for name, res in all_results.items():
        print(f"{name}: {res['run_dir']} ({res['seconds']:.0f} s)")
    tensorized = run("Tensorized", TENSORIZED, quiet)
    print(f"\nTensorized digits CNN (theta 0.9), n={tensorized['n']}, accuracy in % over {tensorized['draws']} "
          "draws of the randomness (mean ± std):\n")
    print(randomized_table(tensorized))
    print(f"Tensorized: {tensorized['run_dir']} ({tensorized['seconds']:.0f} s); loss landscapes in "
          f"{tensorized['run_dir']}/landscape/")
    all_results["Tensorized"] = tensorized
    print("\nWatch the runs: tensorboard --logdir runs")
    Path("runs/demo").mkdir(parents=True, exist_ok=True)
    Path("runs/demo/summary.json").write_text(json.dumps(
        {k: {kk: v for kk, v in r.items() if kk != "per_example"} for k, r in all_results.items()}, indent=1))


if __name__ == "__main__":
    main()
