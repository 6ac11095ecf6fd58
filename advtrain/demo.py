"""``make demo``: everything the package trains, on scikit-learn's bundled 8x8 digits, as the cells of one table
(``configs/tables/demo.yaml``) that ``advtrain sweep`` runs two at a time on this machine; then its four tables.

1. Standard training, PGD adversarial training and NuAT-WA of a small CNN under FGSM, PGD and AutoAttack.
2. A tensorized (randomized Tucker, theta 0.9) CNN over 10 draws with single-draw PGD, EOT PGD and the omniscient
   attacker (mean ± std over draws).
3. Gradient-norm regularization and SGR (with the covariance tracker) beside the standard model, under PGD,
   DeepFool (rho), long-range correlated noise and uniform noise.
4. ADR beside its ADV baseline (PGD-AT with the same optimizer), under PGD, multi-targeted PGD and MIM.

Every cell goes through the commands a user runs (``advtrain fit`` / ``advtrain test``), so the run directories
under ``runs/demo/<row>/seed_0`` hold the TensorBoard events, checkpoints and robustness results. A second
``make demo`` finds every cell finished and prints the tables again (``make clean`` starts over).
"""

from __future__ import annotations

import sys
from pathlib import Path

from advtrain import sweep
from advtrain.evaluation.results import Accuracy, EvaluationResults, SettingResult
from advtrain.tables import load_table

TABLE = "configs/tables/demo.yaml"


def results_of(run_dir: Path) -> EvaluationResults:
    """The newest robustness results of a cell (its test of the best checkpoint)."""
    files = sorted(run_dir.glob("robustness*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"no robustness results in {run_dir}: did its cell fail? See the sweep's output above")
    return EvaluationResults.read(files[-1])


def table(all_results: dict[str, EvaluationResults]) -> str:
    """One row per model; a column per attack: accuracy in %, or for DeepFool (a minimal perturbation, so its
    accuracy is 0 by construction) its rho."""
    def cell(a: SettingResult) -> str:
        return f"{a.metrics['rho']:.4f}" if "rho" in (a.metrics or {}) else f"{100 * a.accuracy:.1f}"

    attacks = next(iter(all_results.values())).attacks
    names = [a.name + (" rho" if "rho" in (a.metrics or {}) else "") for a in attacks]
    lines = ["| defense | clean | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for defense, res in all_results.items():
        cells = [f"{100 * res.clean.accuracy:.1f}"] + [cell(a) for a in res.attacks]
        lines.append(f"| {defense} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def randomized_table(res: EvaluationResults) -> str:
    """Rows: budgets; columns: clean, single-draw PGD, EOT PGD, omniscient PGD (mean ± std over draws)."""
    def cell(score: Accuracy) -> str:
        return f"{100 * score.accuracy:.1f} ± {100 * score.accuracy_std:.1f}"

    pgd = [a for a in res.attacks if a.attack == "pgd"]
    lines = ["| eps | clean | PGD-20 (no EOT) | PGD-20 EOT-10 | PGD-20 omniscient |", "|---|---|---|---|---|"]
    for eps in sorted({a.setting["eps_label"] for a in pgd}, key=float):
        at = {(a.setting["eot_samples"] > 1, a.setting["omniscient"]): a.score for a in pgd
              if a.setting["eps_label"] == eps}
        lines.append(f"| {eps} | {cell(res.clean)} | {cell(at[False, False])} | {cell(at[True, False])} | "
                     f"{cell(at[False, True])} |")
    return "\n".join(lines)


def main():
    if not Path(TABLE).exists():
        raise SystemExit(f"{TABLE} not found: run `make demo` from the repository root")
    code = sweep.main([TABLE, "--parallel", "2"], show_table=False)
    if code:
        sys.exit(code)
    cells = {cell.row: results_of(cell.run_dir) for cell in load_table(TABLE).cells()}
    first = {name: cells[row] for name, row in (("Standard", "standard"), ("PGD-AT", "pgd_at"), ("NuAT-WA", "nuat_wa"))}
    print(f"\nDigits test set (n={first['Standard'].n}); accuracy in %; robust = correct both clean and attacked:\n")
    print(table(first))

    tensorized = cells["tensorized"]
    print(f"\nTensorized digits CNN (theta 0.9), n={tensorized.n}, accuracy in % over {tensorized.draws} "
          "draws of the randomness (mean ± std):\n")
    print(randomized_table(tensorized))
    print(f"loss landscapes in {tensorized.path.parent}/landscape/")

    regularized = {"Standard": cells["standard_reg"], "GN": cells["gn"], "SGR": cells["sgr"]}
    print("\nGradient regularization (GN: Sigma = I; SGR: Sigma tracked from sign perturbations); accuracy in %; "
          "DeepFool's rho = mean ||r||/||x|| over the test set (larger: more robust):\n")
    print(table(regularized))

    latent = {"ADR": cells["adr"], "ADV (PGD-AT)": cells["adr_adv"]}
    print("\nADR (latent compactness) and its ADV baseline, same network, optimizer and attack; accuracy in %; "
          "multi-targeted PGD: robust only if a targeted PGD toward every other class fails:\n")
    print(table(latent))
    print(f"t-SNE of the latent space: {cells['adr'].path.parent}/latent_tsne/")
    print("\nThe runs: runs/demo/<row>/seed_0; watch them with tensorboard --logdir runs/demo")


if __name__ == "__main__":
    main()
