"""``make demo``: everything the package trains, on scikit-learn's bundled 8x8 digits, each table printed as it ends.

1. Standard training, PGD adversarial training and NuAT-WA of a small CNN under FGSM, PGD and AutoAttack.
2. A tensorized (randomized Tucker, theta 0.9) CNN over 10 draws with single-draw PGD, EOT PGD and the omniscient
   attacker (mean ± std over draws).
3. Gradient-norm regularization and SGR (with the covariance tracker) beside the standard model, under PGD,
   DeepFool (rho), long-range correlated noise and uniform noise.
4. ADR beside its ADV baseline (PGD-AT with the same optimizer), under PGD, multi-targeted PGD and MIM.

Everything goes through the same CLI a user runs (``advtrain fit`` / ``advtrain test``), so the run
directories under ``runs/demo/`` hold the TensorBoard events, checkpoints and robustness results.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from advtrain.cli import AdvtrainCLI
from callbacks import RobustnessEvaluation

DEMOS = {"Standard": "configs/demo/standard.yaml", "PGD-AT": "configs/demo/pgd_at.yaml",
         "NuAT-WA": "configs/demo/nuat.yaml"}
TENSORIZED = "configs/demo/tensorized.yaml"
REGULARIZED = {"GN": "configs/demo/gn.yaml", "SGR": "configs/demo/sgr.yaml"}
LATENT = {"ADR": "configs/demo/adr.yaml", "ADV (PGD-AT)": "configs/demo/adr_adv.yaml"}


def run(name: str, config: str, quiet_args: list[str]) -> dict:
    """``advtrain fit`` then ``advtrain test`` of the best checkpoint; the test's results (and where they are)."""
    if not Path(config).exists():
        raise SystemExit(f"{config} not found: run `make demo` from the repository root")
    t0 = time.time()
    fit = AdvtrainCLI(args=["fit", "-c", config, *quiet_args])
    best = fit.trainer.checkpoint_callback.best_model_path
    results = test(config, best, quiet_args)
    results["checkpoint"] = best
    results["seconds"] = time.time() - t0
    return results


def test(config: str, checkpoint: str, args: list[str]) -> dict:
    cli = AdvtrainCLI(args=["test", "-c", config, "--ckpt_path", checkpoint, *args])
    results = next(cb.results for cb in cli.trainer.callbacks if isinstance(cb, RobustnessEvaluation))
    results["run_dir"] = cli.trainer.log_dir
    return results


def with_suite_of(config: str) -> list[str]:
    """CLI arguments that evaluate with ``config``'s attack suite (to put the standard model in another table)."""
    attacks = yaml.safe_load(Path(config).read_text())["evaluation"]["attacks"]
    return ["--evaluation.attacks", json.dumps(attacks)]


def table(all_results: dict[str, dict]) -> str:
    """One row per model; a column per attack: accuracy in %, or for DeepFool (a minimal perturbation, so its
    accuracy is 0 by construction) its rho."""
    def cell(a: dict) -> str:
        return f"{a['metrics']['rho']:.4f}" if "rho" in a.get("metrics", {}) else f"{100 * a['accuracy']:.1f}"

    attacks = next(iter(all_results.values()))["attacks"]
    names = [a["name"] + (" rho" if "rho" in a.get("metrics", {}) else "") for a in attacks]
    lines = ["| defense | clean | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for defense, res in all_results.items():
        cells = [f"{100 * res['clean']['accuracy']:.1f}"] + [cell(a) for a in res["attacks"]]
        lines.append(f"| {defense} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_runs(all_results: dict[str, dict]) -> None:
    for name, res in all_results.items():
        print(f"{name}: {res['run_dir']} ({res['seconds']:.0f} s)")


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
    print_runs(all_results)

    tensorized = run("Tensorized", TENSORIZED, quiet)
    print(f"\nTensorized digits CNN (theta 0.9), n={tensorized['n']}, accuracy in % over {tensorized['draws']} "
          "draws of the randomness (mean ± std):\n")
    print(randomized_table(tensorized))
    print(f"Tensorized: {tensorized['run_dir']} ({tensorized['seconds']:.0f} s); loss landscapes in "
          f"{tensorized['run_dir']}/landscape/")

    # the standard model of table 1, evaluated again with the regularizers' suite (a results file of its own)
    t0 = time.time()
    standard = test(DEMOS["Standard"], all_results["Standard"]["checkpoint"], quiet + with_suite_of(REGULARIZED["GN"]))
    standard["seconds"] = time.time() - t0
    regularized = {"Standard": standard, **{name: run(name, cfg, quiet) for name, cfg in REGULARIZED.items()}}
    print("\nGradient regularization (GN: Sigma = I; SGR: Sigma tracked from sign perturbations); accuracy in %; "
          "DeepFool's rho = mean ||r||/||x|| over the test set (larger: more robust):\n")
    print(table(regularized))
    print_runs(regularized)

    latent = {name: run(name, cfg, quiet) for name, cfg in LATENT.items()}
    print("\nADR (latent compactness) and its ADV baseline, same network, optimizer and attack; accuracy in %; "
          "multi-targeted PGD: robust only if a targeted PGD toward every other class fails:\n")
    print(table(latent))
    print_runs(latent)

    print("\nWatch the runs: tensorboard --logdir runs")
    summary = {**all_results, "Tensorized": tensorized, **{f"{k} (regularization table)": v
                                                           for k, v in regularized.items()}, **latent}
    Path("runs/demo").mkdir(parents=True, exist_ok=True)
    path, k = Path("runs/demo/summary.json"), 1
    while path.exists():  # an earlier demo's summary stays
        k += 1
        path = Path(f"runs/demo/summary-{k}.json")
    path.write_text(json.dumps(
        {k: {kk: v for kk, v in r.items() if kk != "per_example"} for k, r in summary.items()}, indent=1))


if __name__ == "__main__":
    main()
