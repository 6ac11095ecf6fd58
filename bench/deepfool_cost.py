"""Our batched DeepFool against torchattacks 3.5.1's DeepFool, on the same inputs and labels.

ResNet-18 (10 classes, fixed seed, eval mode) on CIFAR-shaped inputs in [0, 1], on the CPU by default. Both attacks
run 50 steps with overshoot 0.02. The labels are the model's own predictions: torchattacks starts from the label
and returns at once where the model is already wrong, ours from the prediction, so with these labels both attack
every example from the same class and do the same job. Each time is the median of ``--repeats`` runs after a
warm-up on two examples. Prints the ratio torchattacks / ours and writes it as JSON (``--out``).

    python bench/deepfool_cost.py                     # CPU, batch 64, torch's default thread count
    python bench/deepfool_cost.py --threads 1 --batch-size 16

Why ours is faster: torchattacks loops over examples, and per example and iteration runs a batch-1 forward and 10
full backward passes (one per class, weight gradients included). Ours runs per iteration one batched forward of the
examples still active and 9 input-only backward passes (one per candidate but k^). Batch-1 convolutions use a CPU
poorly (1 thread: 14 ms for a batch-1 ResNet-18 forward, 6 ms per example at batch 64), and weight gradients add
to every backward pass. ``make bench`` writes the measured times to bench/results/deepfool_cost.json, which the
README's Performance section quotes (``bench/readme_table.py``).

Run it on an otherwise idle machine: another busy process stalls torch's thread barriers at every operator, and
torchattacks runs about 20 times more (batch-1) operators, so its time inflates far more (53x was once measured
that way); --threads 1 is robust to it. "flipped" re-checks both outputs in one batch: torchattacks has no 1e-5 in
its step and lands within float noise of the boundary (this random network's logits span about 0.03), so the
re-check counts some of its examples as not flipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advtrain.attacks.deepfool import deepfool_iterations  # noqa: E402
from advtrain.networks import ResNet18  # noqa: E402
from bench.results_file import RESULTS, write_results  # noqa: E402
from bench.step_cost import timed  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32, help="height and width of the inputs")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--overshoot", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per attack (torchattacks is slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=str(RESULTS / "deepfool_cost.json"))
    args = parser.parse_args(argv)

    import torchattacks

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ResNet18(num_classes=10).to(device).eval()
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    ta_deepfool = torchattacks.DeepFool(model, steps=args.steps, overshoot=args.overshoot)
    results = {}

    def ours(n=args.batch_size):
        results["ours"] = deepfool_iterations(model, x[:n], y[:n], steps=args.steps, overshoot=args.overshoot)

    def theirs(n=args.batch_size):
        results["torchattacks"] = ta_deepfool(x[:n], y[:n])  # the attack object puts the model in eval mode

    ours(2), theirs(2)  # warm-up (allocator, kernels) on two examples: a full torchattacks run takes minutes
    seconds = {"ours": timed(ours, device, args.repeats, warmup=0),
               "torchattacks": timed(theirs, device, args.repeats, warmup=0)}
    assert not model.training
    x_ours, iterations = results["ours"]
    with torch.no_grad():
        flipped = {name: float((model(x_adv).argmax(dim=1) != y).float().mean())
                   for name, x_adv in (("ours", x_ours), ("torchattacks", results["torchattacks"]))}
    ratios = {"deepfool_vs_torchattacks": seconds["torchattacks"] / seconds["ours"]}
    result = {
        "torchattacks": torchattacks.__version__, "batch_size": args.batch_size, "image_size": args.image_size,
        "steps": args.steps, "overshoot": args.overshoot, "repeats": args.repeats,
        "mean_iterations_ours": float(iterations.double().mean()), "flipped": flipped,
        "seconds": seconds, "ratios": ratios,
    }
    print(f"DeepFool, batch {args.batch_size}, {torch.get_num_threads()} threads: ours {seconds['ours']:.2f} s "
          f"({result['mean_iterations_ours']:.2f} iterations on average), torchattacks "
          f"{seconds['torchattacks']:.2f} s; torchattacks / ours = {ratios['deepfool_vs_torchattacks']:.1f}x; "
          f"flipped: ours {flipped['ours']:.0%}, torchattacks {flipped['torchattacks']:.0%}")
    return write_results(args.out, result, device)


if __name__ == "__main__":
    main()
