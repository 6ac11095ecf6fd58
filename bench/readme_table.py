"""Write the performance figures of bench/README.md from the result files in bench/results/.

    python bench/readme_table.py            # rewrite the part of bench/README.md between the bench markers
    python bench/readme_table.py --check    # exit 1, showing the difference, when bench/README.md says otherwise

Every figure between ``<!-- bench:begin ... -->`` and ``<!-- bench:end -->`` comes from a JSON file that a bench
script wrote (``make bench`` runs them, then this script), with the machine, threads, date and batch of that file
next to it. Measured ratios are written "N.NNx"; estimates from theory never are ("about 7.7 times"). A file
written before the benches recorded a key (the machine, the date, the NuAT settings) shows it as not recorded; a
bench without a results file has no figures here. The top-level README.md quotes none: it links here.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- bench:begin: written by `python bench/readme_table.py` from bench/results/*.json, do not edit -->"
END = "<!-- bench:end -->"
BEGIN_PREFIX = "<!-- bench:begin"
MISSING = "not recorded"
WIDTH = 110


def load(results: Path) -> dict[str, dict]:
    """Every result file in ``results`` by name (``step_cost``, ...)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(results).glob("*.json"))}


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def timed_runs(n: int) -> str:
    return f"{n} timed run{'s' if n != 1 else ''}"


def threads(result: dict) -> str:
    n = result.get("threads")
    count = f"threads {MISSING}" if n is None else f"{n} thread{'s' if n != 1 else ''}"
    return f"{result['device']}, {count}" if "device" in result else count


def date(result: dict) -> str:
    return result["date"][:10] if "date" in result else MISSING


def paragraph(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), WIDTH, break_long_words=False, break_on_hyphens=False)


# (results file, key in its "ratios", what the figure is)
FIGURES = [
    ("step_cost", "pgd10_vs_clean", "PGD-10 training step / clean step"),
    ("step_cost", "trades10_vs_clean", "TRADES-10 step / clean step"),
    ("step_cost", "fgsm_rs_vs_clean", "FGSM-RS step / clean step"),
    ("step_cost", "nuat_vs_clean", "NuAT step / clean step"),
    ("step_cost", "nuat2_vs_clean", "NuAT2 step / clean step"),
    ("step_cost", "pgd_ours_vs_torchattacks", "our PGD-10 attack / torchattacks' PGD-10"),
    ("tensorized_cost", "tensorized_vs_plain", "tensorized ResNet-18 / plain, forward+backward"),
    ("tensorized_cost", "tensorized_theta1_vs_plain", "the same at theta 1 (no masks) / plain"),
    ("deepfool_cost", "deepfool_vs_torchattacks", "torchattacks' DeepFool / ours (time)"),
    ("evaluation_cost", "current_vs_baseline", "PGD-20 evaluation: this checkout / baseline"),
    ("adr_cost", "adr_vs_pgd_at", "ADR step / PGD-AT step, same PGD-10 (C&W CIFAR CNN)"),
    ("sgr_cost", "gn_vs_clean", "GN step / clean step (C&W CIFAR CNN)"),
    ("sgr_cost", "sgr_stationary_vs_clean", "SGR step, stationary Sigma, tracker source `gradient` every step / clean"),
    ("sgr_cost", "sgr_stationary_step_gradient_vs_clean", "the same, source `step_gradient` every step / clean"),
    ("sgr_cost", "sgr_stationary_every10_vs_clean", "the same, source `gradient` every 10 steps (derived) / clean"),
    ("sgr_cost", "sgr_stationary_frozen_vs_clean", "SGR step, stationary Sigma frozen / clean"),
    ("sgr_cost", "sgr_stationary_fgsm_vs_clean", "SGR step, tracker source `fgsm` every step / clean"),
    ("sgr_cost", "sgr_stationary_pgd_vs_clean", "SGR step, tracker source `pgd` (10 steps) every step / clean"),
    ("sgr_cost", "sgr_full_vs_clean", "SGR step, full d x d Sigma, source `gradient` every step / clean"),
    ("covariance_cost", "update_stationary_vs_clean", "covariance tracker update alone (stationary) / clean step"),
    ("covariance_cost", "update_full_vs_clean", "covariance tracker update alone (full d x d) / clean step"),
    ("covariance_cost", "matvec_conv_vs_fft", "stationary Sigma g by conv2d / by FFT (time)"),
    ("covariance_cost", "psd_projection_vs_clean", "stationary Sigma's PSD projection (once per update) / clean step"),
    ("sweep_cost", "sequential_vs_two_at_a_time", "`advtrain sweep`: cells one after another / two at a time"),
]


def table(results: dict[str, dict]) -> str:
    """One row per figure, and per batch size for a file that measured several (its ``runs``)."""
    rows = ["| Measured | Ratio | Batch | Device, threads | Date | File in `bench/results/` |",
            "|---|---:|---:|---|---|---|"]
    for name, key, what in FIGURES:
        result = results.get(name, {})
        for run in result.get("runs") or [result]:
            if key in run.get("ratios", {}):
                rows.append(f"| {what} | {ratio(run['ratios'][key])} | {run.get('batch_size', MISSING)} "
                            f"| {threads(result)} | {date(result)} | `{name}.json` |")
    return "\n".join(rows)


def sources(results: dict[str, dict]) -> str:
    """Where and with what each file was measured."""
    lines = []
    for name in dict.fromkeys(name for name, _, _ in FIGURES if name in results):
        result = results[name]
        machine = result.get("machine", MISSING)
        parts = [f"machine {machine}" + (f" ({result['processor']})" if result.get("processor") else ""),
                 f"{result['cpus']} CPUs" if "cpus" in result else None, threads(result),
                 f"torch {result['torch']}" if "torch" in result else None,
                 f"torchattacks {result['torchattacks']}" if "torchattacks" in result else None,
                 "bf16 autocast" if result.get("bf16") else ("fp32" if "bf16" in result else None),
                 "channels-last" if result.get("channels_last") else None,
                 timed_runs(result["repeats"]) if "repeats" in result else None,
                 f"date {result.get('date', MISSING)}"]
        lines.append(f"- `{name}.json`: " + ", ".join(part for part in parts if part))
    return "\n".join(textwrap.fill(line, WIDTH, subsequent_indent="  ", break_long_words=False,
                                   break_on_hyphens=False) for line in lines)


def nuat_text(settings: dict | None) -> str:
    if not settings or "nuat" not in settings or "nuat2" not in settings:
        return ("This file does not record the NuAT settings: it was written before step_cost.py read them from "
                "the configs, when NuAT and NuAT2 were both timed with the nuclear term on every minibatch "
                "(nuclear_every 1; configs/cifar10/nuat.yaml uses 2). `make bench` measures with the configs' "
                "settings and records them.")

    def describe(name: str, label: str) -> str:
        s = settings[name]
        return (f"{label} as `{s.get('config', MISSING)}`: attack_steps {s.get('attack_steps', MISSING)}, "
                f"nuclear_every {s.get('nuclear_every', MISSING)}, lambda {s.get('lambda_max', MISSING)}")

    return (f"{describe('nuat', 'NuAT')}; {describe('nuat2', 'NuAT2')} (on ResNet-18; with the nuclear term in the "
            "attack on every n-th minibatch, one timing covers n minibatches).")


def step_cost_text(result: dict) -> str:
    seconds = result.get("seconds", {})
    attack = ""
    if {"pgd10_attack_ours", "pgd10_attack_torchattacks"} <= set(seconds):
        attack = (f" The PGD-10 attack alone took {1000 * seconds['pgd10_attack_ours']:.0f} ms per batch here, "
                  f"torchattacks' {1000 * seconds['pgd10_attack_torchattacks']:.0f} ms.")
    return "\n\n".join(paragraph(text) for text in (
        "`bench/step_cost.py` times one training step of each defense (zero_grad, the defense's loss with its "
        "attack, backward, SGD step; the median of `--repeats` runs after a warm-up) on a CIFAR-shaped ResNet-18 "
        "batch and divides it by a clean step, and times our PGD-10 attack against torchattacks' on the same "
        f"model and batch.{attack} {nuat_text(result.get('settings'))}",
        "Theory with input-only gradients in the attack: a clean step is about 3 forward-equivalents (forward and "
        "backward with weight gradients), an attack iteration about 2 (forward and input-only backward), so "
        "PGD-10 costs about (10 * 2 + 3) / 3 = 7.7 clean steps; `loss.backward()` in the attack would make it "
        "about 11. NuAT: a clean forward+backward, one attack iteration and the adversarial forward+backward, "
        "about 8 / 3 = 2.7 clean steps, plus two small SVDs (B x 10) where the attack uses the nuclear term; "
        "NuAT2 one attack iteration more, about 3.3. On a GPU: "
        "`python bench/step_cost.py --device cuda --batch-size 128 --bf16 --channels-last`.",
    ))


def tensorized_cost_text(result: dict) -> str:
    seconds = result.get("seconds", {})
    rank, theta = result.get("rank", MISSING), result.get("theta", MISSING)
    rank = "full rank" if rank == 1.0 else f"rank {rank}"
    runs = result.get("runs") or [{"batch_size": result.get("batch_size", MISSING), "seconds": seconds}]
    plain = ", ".join(f"{1000 * run['seconds']['plain']:.0f} ms at batch {run['batch_size']}"
                      for run in runs if "plain" in run.get("seconds", {}))
    reconstruction = ""
    if "reconstruction_forward" in seconds:
        reconstruction = (f" Rebuilding every weight (what reading each layer's `weight` costs) took "
                          f"{1000 * seconds['reconstruction_forward']:.0f} ms per forward without gradients here "
                          f"(the plain forward+backward: {plain}).")
    blocks = ("one block of interleaved rounds per batch size" if len(runs) > 1 else "in interleaved rounds")
    return paragraph(
        f"`bench/tensorized_cost.py` times a forward+backward of the tensorized ResNet-18 ({rank}, theta {theta}) "
        f"against the plain one at CIFAR shape, {blocks} (the median of each kind), and the same network at theta 1, "
        f"without the masks: the gap between the two is what the masks cost.{reconstruction} That cost does not "
        "depend on the batch size, so it weighs more at a small batch. Where it costs fewer multiply-adds (for "
        "feature maps with fewer positions than the kernel has entries per output channel: the last stage's "
        "convolutions at batch 128, the 256-channel ones too at batch 32), a tensorized convolution does not rebuild "
        "its channel modes but applies their factors as 1x1 convolutions before and after the convolution with the "
        "rest of the kernel (the same function). Theory (multiply-adds, full rank, every weight rebuilt): about "
        "9.5 G against 71.7 G for the forward at batch 128, so about 1.13 times the plain step, and about 1.53 times "
        "at batch 32.")


def deepfool_cost_text(result: dict) -> str:
    seconds = result.get("seconds", {})
    times = ""
    if {"ours", "torchattacks"} <= set(seconds):
        times = f": ours {seconds['ours']:.1f} s, torchattacks {seconds['torchattacks']:.1f} s"
        if "mean_iterations_ours" in result:
            times += f" ({result['mean_iterations_ours']:.1f} iterations per example on average for ours)"
    return paragraph(
        "`bench/deepfool_cost.py` times our batched DeepFool against torchattacks' per-example DeepFool on the "
        f"same {result.get('batch_size', MISSING)} CIFAR-shaped inputs with ResNet-18 "
        f"({result.get('steps', MISSING)} steps, overshoot {result.get('overshoot', MISSING)}, the model's own "
        f"predictions as labels){times}. Measure it on an otherwise idle machine: torchattacks' many batch-1 "
        "operators suffer most from a busy one.")


def evaluation_cost_text(result: dict) -> str:
    commits = result.get("commits") or {}
    medians = result.get("median_seconds", {})
    times = ""
    if {"current", "baseline"} <= set(medians):
        times = f": median {medians['current']:.3f} s against {medians['baseline']:.3f} s"
    same = ", with the same results example for example" if result.get("same_results") else ""
    return paragraph(
        "`bench/evaluation_cost.py --baseline <checkout>` (not in `make bench`: it needs a second checkout) "
        "compares a PGD-20 evaluation (digits CNN, 360 examples, three budgets) of this checkout with another "
        f"one's, in alternating fresh processes ({result.get('repeats', MISSING)} each). Measured for the move of "
        "the evaluation engine from one callback into `evaluation/`: commit "
        f"{commits.get('current', MISSING)} against {commits.get('baseline', MISSING)}{times}{same}.")


def adr_cost_text(result: dict) -> str:
    seconds = result.get("seconds", {})
    times = ""
    if {"pgd_at", "adr"} <= set(seconds):
        times = f" ({1000 * seconds['adr']:.0f} ms against {1000 * seconds['pgd_at']:.0f} ms per step)"
    return paragraph(
        "`bench/adr_cost.py` times an ADR training step (every term on) against a PGD-AT step with the same PGD-10, "
        f"network ({result.get('network', MISSING)}, latent {result.get('latent_dim', MISSING)}-d) and batch{times}. "
        "Theory: PGD-AT is about 10 * 2 + 3 = 23 forward-equivalents; ADR's 0.5 CE(x) needs a clean forward and "
        "backward more (about 3), so about 26 / 23 = 1.13 times; the compactness terms themselves (one cdist) cost "
        "about 1%. One forward of the concatenated clean and adversarial batch instead of two was slower on the CPU.")


def sgr_cost_text(result: dict) -> str:
    return paragraph(
        "`bench/sgr_cost.py` times GN and SGR steps (C&W CIFAR CNN, Adam) against a clean step, by default in the "
        "process's CPU time on one thread, with `advtrain.callbacks.CovarianceTracker` driven as in training (its "
        "update in "
        "`on_train_batch_end`). Theory: GN adds an input-only backward that keeps its graph and a backward through "
        "it, about 2 times a clean step; the tracker's `gradient` source crafts the paper's predicted-label gradient "
        "(a forward and an input-only backward more, about 1.1 clean steps measured), which `update_every` amortizes "
        "(the paper: updating every step is not needed) and `step_gradient` avoids by reusing SGR's own g.")


def covariance_cost_text(result: dict) -> str:
    return paragraph(
        "`bench/covariance_cost.py` times the covariance tracker's update alone (batch moments by FFT, the EMA and "
        "the rescaling) against a clean step of the C&W CIFAR CNN, the stationary Sigma g by FFT against conv2d with "
        "the (2H-1) x (2W-1) kernel, and the PSD projection each new stationary Sigma gets (`psd: project`).")


def sweep_cost_text(result: dict) -> str:
    seconds = result["seconds"]
    return paragraph(
        f"`bench/sweep_cost.py` runs `advtrain sweep {result['table']} --seeds {' '.join(result['seeds'])}` twice in "
        f"fresh folders: `--parallel 1` (each cell with all {result.get('cpus', MISSING)} cores' threads) took "
        f"{seconds['parallel_1']:.0f} s, `--parallel 2` (two cells at a time, one thread each) "
        f"{seconds['parallel_2']:.0f} s. Small networks use a second thread poorly, so two cells at once are faster "
        "than one cell with two threads.")


TEXTS = {"step_cost": step_cost_text, "tensorized_cost": tensorized_cost_text,
         "deepfool_cost": deepfool_cost_text, "evaluation_cost": evaluation_cost_text, "adr_cost": adr_cost_text,
         "sgr_cost": sgr_cost_text, "covariance_cost": covariance_cost_text, "sweep_cost": sweep_cost_text}


def render(results: dict[str, dict]) -> str:
    """The generated part of bench/README.md, markers included."""
    blocks = [BEGIN, table(results), "Where each file was measured:\n\n" + sources(results)]
    blocks += [text(results[name]) for name, text in TEXTS.items() if name in results]
    return "\n\n".join(blocks) + "\n" + END


def replace_section(readme: str, generated: str) -> str:
    """``readme`` with the text from the begin marker through the end marker replaced by ``generated``."""
    start = readme.find(BEGIN_PREFIX)
    end = readme.find(END, start + 1)
    if start < 0 or end < 0:
        raise ValueError(f"no {BEGIN_PREFIX} ... --> and {END} markers")
    return readme[:start] + generated + readme[end + len(END):]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the page differs")
    parser.add_argument("--readme", type=Path, default=ROOT / "bench" / "README.md",
                        help="the page with the bench markers (default: bench/README.md)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    readme = args.readme.read_text()
    try:
        updated = replace_section(readme, render(load(args.results)))
    except ValueError as error:
        print(f"{args.readme}: {error}", file=sys.stderr)
        return 2
    if updated == readme:
        print(f"{args.readme}: the performance figures match {args.results}")
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(readme.splitlines(True), updated.splitlines(True),
                                                   str(args.readme), f"from {args.results}"))
        print(f"{args.readme} differs from {args.results}: run python bench/readme_table.py", file=sys.stderr)
        return 1
    args.readme.write_text(updated)
    print(f"{args.readme}: performance figures rewritten from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
