"""Cost of a PGD-20 robustness evaluation with this checkout's evaluation engine, against another checkout's.

The evaluation engine moved from one callback into ``evaluation/`` (the attack table, threat models, cache,
statistics, writers); this measures that the move costs nothing. Both checkouts evaluate the same network (the
digits CNN, seeded weights) on the same 360 test digits with the same suite (PGD-20 at three budgets, no sanity
runs), each in a fresh Python process, alternating A B A B ... so that machine noise hits both alike. Only the
``trainer.test`` call is timed. Prints the medians and the ratio and writes them as JSON.

    git worktree add /tmp/before <commit before the refactor>
    python bench/evaluation_cost.py --baseline /tmp/before
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = [{"attack": "pgd", "eps": [0.05, 0.1, 0.2], "steps": 20}]
BATCH_SIZE = 128


def worker(repo: str, threads: int) -> None:
    """Evaluate once with the code in ``repo``; print the seconds of ``trainer.test``."""
    sys.path.insert(0, repo)
    import pytorch_lightning as pl
    import torch

    from advtrain.callbacks import RobustnessEvaluation
    from advtrain.datamodules import Digits
    from advtrain.defenses import Standard
    from advtrain.networks import DigitsCNN

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Standard(network=DigitsCNN(), eps=0.1)
    evaluation = RobustnessEvaluation(attacks=SUITE, sanity_checks=False, resume=False, batch_size=BATCH_SIZE)
    seconds = []
    for _ in range(3):  # the fastest of three in one process: start-up effects (allocator, caches) left out
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             inference_mode=False, default_root_dir=tempfile.mkdtemp(), callbacks=[evaluation])
        start = time.perf_counter()
        trainer.test(model, datamodule=Digits(), verbose=False)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": min(seconds), "correct": [a.score.correct for a in evaluation.results.attacks]}))


def measure(repo: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", repo, "--threads", str(threads)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="a checkout of the code to compare with (e.g. a git worktree)")
    parser.add_argument("--repeats", type=int, default=11, help="processes per checkout")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per evaluation")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "evaluation_cost.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.threads)
        return {}
    if not args.baseline:
        parser.error("--baseline: the checkout to compare with is required")
    sys.path.insert(0, str(ROOT))  # here, not at the top: a worker imports only its own checkout's code
    from bench.results_file import write_results
    times: dict[str, list[float]] = {"current": [], "baseline": []}
    correct = {}
    for _ in range(args.repeats):
        for name, repo in (("current", str(ROOT)), ("baseline", args.baseline)):
            run = measure(repo, args.threads)
            times[name].append(run["seconds"])
            correct[name] = run["correct"]
    if correct["current"] != correct["baseline"]:
        raise SystemExit(f"the two checkouts disagree on the results: {correct}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    commits = {name: subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or None
               for name, repo in (("current", str(ROOT)), ("baseline", args.baseline))}
    result = {"what": "PGD-20 evaluation (3 budgets, 360 digits, DigitsCNN), trainer.test seconds",
              "threads": args.threads, "batch_size": BATCH_SIZE, "repeats": args.repeats,
              "baseline": args.baseline, "commits": commits, "seconds": times, "median_seconds": medians,
              "ratios": {"current_vs_baseline": medians["current"] / medians["baseline"]},
              "same_results": True}
    print(f"PGD-20 evaluation: current {medians['current']:.3f} s, baseline {medians['baseline']:.3f} s "
          f"(median of {args.repeats}, {args.threads} thread(s)): ratio {result['ratios']['current_vs_baseline']:.3f}")
    return write_results(args.out, result)  # the workers' thread count, not this process's


if __name__ == "__main__":
    main()
