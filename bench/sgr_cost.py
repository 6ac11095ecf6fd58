"""Cost of an SGR / GN training step relative to a clean step (issue 10's budget: GN <= 3.0x, SGR with the stationary
covariance <= 3.5x including the tracker's update).

The SGR paper's setting at CIFAR-10 shape: ``advtrain.networks.CarliniCNN("cifar")`` (dropout 0.5, no BatchNorm), Adam,
batch 128 by default. Each step is zero_grad + the defense's loss + backward + Adam step, timed as the median of
``--repeats`` interleaved rounds after a warm-up, by default in CPU time of the process on one thread (other
processes on a shared machine then change little). Rows:

* ``clean``: ``advtrain.defenses.Standard``;
* ``gn``: ``advtrain.defenses.GN`` (Sigma = I): one forward, an input-only backward with ``create_graph``, one backward
  through both graphs;
* ``sgr_stationary``: ``advtrain.defenses.SGR`` with ``advtrain.callbacks.CovarianceTracker(representation="stationary",
  source="gradient", update_every=1)`` driven step by step as Lightning does (``on_train_batch_end`` after the
  optimizer step, with a stub trainer): the tracker's own input gradient at the predicted label (one no-grad
  forward for the prediction, one forward and input-only backward), the EMA update of eq. 15 and the rescaling
  of the Sigma the module reads; Sigma g by FFT;
* ``sgr_stationary_fgsm`` / ``sgr_stationary_pgd``: the same with the tracker's FGSM / PGD-10 sources (the paper's
  SGR-FGSM / SGR-PGD rows: crafting an attack every step costs what the attack costs);
* ``sgr_stationary_frozen``: the SGR step with Sigma frozen (no update; ``freeze_after_steps``); and
  ``sgr_stationary_every10``, derived: frozen + (sgr_stationary - frozen) / 10, the per-step cost with
  ``update_every: 10``;
* ``sgr_stationary_step_gradient``: the tracker's ``step_gradient`` source, which reuses SGR's own
  ``outputs["input_gradient"]`` (true label, train mode) instead of crafting a fresh gradient;
* ``sgr_full``: source ``gradient`` with the d x d ``full`` representation (the paper's choice for small inputs);
* ``tracker_update``: the update alone from given perturbations (``CovarianceTracker.observe``: batch statistics,
  EMA, rescaling; the issue's budget: at most 10% of a clean step); ``tracker_gradient_source``: crafting the
  ``gradient`` source alone.

The tracker scales with ``scale: unit`` here (the stub has no data set to measure); ``data`` runs the same
rescaling with another target, at the same cost.

Theory: a clean step is about 3 forward-equivalents; GN adds an input-only backward that keeps its graph (~1) and a
backward through that backward graph (~2 more), so about 6 / 3 = 2x plus the double-backward overheads of ReLU,
max-pool and dropout. The tracker's ``gradient`` source adds a no-grad forward and a forward with an input-only
backward (~1x clean measured), so with ``update_every: 1`` SGR-gradient costs about one clean step more than GN.

    python bench/sgr_cost.py                  # CPU, batch 128, 1 thread
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from pytorch_lightning.plugins.precision import Precision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from advtrain.callbacks import CovarianceTracker  # noqa: E402
from advtrain.defenses import GN, SGR, Standard, StepOutput  # noqa: E402
from advtrain.networks import CarliniCNN  # noqa: E402
from bench.results_file import RESULTS, write_results  # noqa: E402

SHAPE = (3, 32, 32)
# row -> (representation, source, how the step updates Sigma: "callback" = on_train_batch_end as in training,
# "frozen" = no update, the SGR step alone)
SGR_ROWS = {"sgr_stationary": ("stationary", "gradient", "callback"),
            "sgr_stationary_frozen": ("stationary", "gradient", "frozen"),
            "sgr_stationary_step_gradient": ("stationary", "step_gradient", "callback"),
            "sgr_stationary_fgsm": ("stationary", "fgsm", "callback"),
            "sgr_stationary_pgd": ("stationary", "pgd", "callback"),
            "sgr_full": ("full", "gradient", "callback")}
UPDATE_EVERY = 10  # the amortized row: the tracker's update_every (the paper: updating every step is not needed)


def timed(fn, repeats: int, clock) -> float:
    """The median of ``repeats`` runs of ``fn`` by ``clock``."""
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def stub_trainer():
    """What the tracker reads of a Trainer: the data's input shape, rank, step and precision context."""
    datamodule = SimpleNamespace(input_shape=SHAPE)
    return SimpleNamespace(datamodule=datamodule, is_global_zero=False, global_step=0, global_rank=0,
                           precision_plugin=Precision(), loggers=[])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1: less noise from neighbours)")
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--clock", choices=("process", "wall"), default="process",
                        help="process: CPU time of this process (with 1 thread, insensitive to other processes "
                             "sharing the cores); wall: elapsed time (for GPUs, or several threads)")
    parser.add_argument("--skip-pgd", action="store_true", help="leave out the slow sgr_stationary_pgd row")
    parser.add_argument("--out", default=str(RESULTS / "sgr_cost.json"))
    args = parser.parse_args(argv)

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.clock == "process" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock process measures one CPU thread: use --threads 1 on cpu, or --clock wall")
    clock = time.process_time if args.clock == "process" else time.perf_counter
    torch.manual_seed(0)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    network = CarliniCNN("cifar").to(device)
    x = torch.rand(args.batch_size, *SHAPE, generator=generator).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)
    trainer = stub_trainer()

    defenses = {"clean": Standard(network=network, eps="8/255"), "gn": GN(network, lam=args.lam, eps="8/255")}
    trackers = {}
    for name, (representation, source, _) in SGR_ROWS.items():
        if name == "sgr_stationary_pgd" and args.skip_pgd:
            continue
        defenses[name] = SGR(network, lam=args.lam, eps="8/255")
        attack_source = source in ("fgsm", "pgd")
        trackers[name] = CovarianceTracker(source={"attack": source, "steps": 10, "step": "2/255"} if attack_source
                                           else source, representation=representation, scale="unit")
        trackers[name].setup(trainer, defenses[name], "fit")
        trackers[name].on_fit_start(trainer, defenses[name])
        defenses[name].fixed_covariance = trackers[name].covariance  # no trainer here to find the tracker in
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)

    steps = {}
    for name, defense in defenses.items():
        defense.train()

        def step(name=name, defense=defense):
            optimizer.zero_grad(set_to_none=True)
            out = defense.defense_loss(x, y, 0)
            out.loss.backward()
            optimizer.step()
            how = SGR_ROWS[name][2] if name in trackers else "frozen"
            if how == "callback":
                trackers[name].on_train_batch_end(trainer, defense, {"step": StepOutput.of(x, y, out)}, (x, y), 0)

        steps[name] = step
    # rounds interleave the rows (each round times every row once; the median over rounds per row), so a change
    # in the load of a shared machine hits every row alike instead of the rows timed during it
    times = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(timed(step, 1, clock))
    seconds = {name: statistics.median(values) for name, values in times.items()}
    for name in steps:
        print(f"{name:>20}: {seconds[name] * 1000:8.1f} ms/step  ({seconds[name] / seconds['clean']:.2f}x clean)")
    tracker, defense = trackers["sgr_stationary"], defenses["sgr_stationary"]
    xi = torch.randn(args.batch_size, *SHAPE, generator=generator).to(device)
    seconds["tracker_update"] = timed(lambda: tracker.observe(xi), max(args.repeats, 5), clock)
    outputs = {"x": x, "y": y}
    seconds["tracker_gradient_source"] = timed(lambda: tracker.perturbations(trainer, defense, outputs, (x, y)),
                                               args.repeats, clock)
    # update_every = N: N - 1 frozen steps and one step with the callback's update, per step
    seconds[f"sgr_stationary_every{UPDATE_EVERY}"] = seconds["sgr_stationary_frozen"] + (
        seconds["sgr_stationary"] - seconds["sgr_stationary_frozen"]) / UPDATE_EVERY
    for name in ("tracker_update", "tracker_gradient_source", f"sgr_stationary_every{UPDATE_EVERY}"):
        print(f"{name:>20}: {seconds[name] * 1000:8.1f} ms  ({seconds[name] / seconds['clean']:.3f}x clean)")
    ratios = {f"{name}_vs_clean": seconds[name] / seconds["clean"] for name in seconds if name != "clean"}
    budgets = {"gn_vs_clean": 3.0, "sgr_stationary_vs_clean": 3.5, "tracker_update_vs_clean": 0.10}
    within = {name: ratios[name] <= limit for name, limit in budgets.items()}
    print("ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()))
    print("within budget: " + ", ".join(f"{k}: {v}" for k, v in within.items()))
    result = {"batch_size": args.batch_size, "network": 'CarliniCNN("cifar")', "optimizer": "Adam",
              "repeats": args.repeats, "lam": args.lam, "clock": args.clock,
              "tracker": {"rows": {k: {"representation": r, "source": s, "update": u}
                                   for k, (r, s, u) in SGR_ROWS.items() if k in trackers},
                          "update_every": 1, "amortized_update_every": UPDATE_EVERY, "scale": "unit", "beta": 0.1,
                          "pgd": {"steps": 10, "step": "2/255"}},
              "seconds": seconds, "ratios": ratios, "budgets": budgets, "within_budget": within}
    return write_results(args.out, result, device)


if __name__ == "__main__":
    main()
