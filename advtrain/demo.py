"""``make demo``: standard training, PGD adversarial training and NuAT-WA of a small CNN on
scikit-learn's bundled 8x8 digits, each evaluated under FGSM and PGD at a few budgets; prints one table.

Everything goes through the same CLI a user runs (``advtrain fit`` / ``advtrain test``), so the run
directories under ``runs/demo/`` hold the TensorBoard events, checkpoints and ``robustness.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from advtrain.cli import AdvtrainCLI

DEMOS = {"Standard": "configs/demo/standard.yaml", "PGD-AT": "configs/demo/pgd_at.yaml",
         "NuAT-WA": "configs/demo/nuat.yaml"}


def run(name: str, config: str, quiet_args: list[str]) -> dict:
    if not Path(config).exists():
        raise SystemExit(f"{config} not found: run `make demo` from the repository root")
    t0 = time.time()
    fit = AdvtrainCLI(args=["fit", "-c", config, *quiet_args])
    best = fit.trainer.checkpoint_callback.best_model_path
    test = AdvtrainCLI(args=["test", "-c", config, "--ckpt_path", best, *quiet_args])
    results = test.trainer.callbacks and next(
        cb.results for cb in test.trainer.callbacks if getattr(cb, "results", None) is not None)
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


def main():
    quiet = ["--trainer.enable_progress_bar", "false"]
    all_results = {name: run(name, cfg, quiet) for name, cfg in DEMOS.items()}
    n = next(iter(all_results.values()))["n"]
    print(f"\nDigits test set (n={n}); accuracy in %; robust = correct both clean and attacked:\n")
    print(table(all_results))
    for name, res in all_results.items():
        print(f"{name}: {res['run_dir']} ({res['seconds']:.0f} s)")
    print("\nWatch the runs: tensorboard --logdir runs")
    Path("runs/demo").mkdir(parents=True, exist_ok=True)
    Path("runs/demo/summary.json").write_text(json.dumps(
        {k: {kk: v for kk, v in r.items() if kk != "per_example"} for k, r in all_results.items()}, indent=1))


if __name__ == "__main__":
    main()
