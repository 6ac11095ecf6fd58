"""Cost of the covariance tracker's update relative to a clean training step, and of Sigma g by FFT or convolution.

CIFAR-10 shape (3 x 32 x 32), batch 128, the Carlini & Wagner CNN (``advtrain.networks.CarliniCNN("cifar")``, SGR's
network)
with Adam. A clean step is zero_grad + cross-entropy forward + backward + optimizer step. The tracker's update is
``CovarianceTracker.observe(xi)``: the batch statistics (FFT autocorrelations binned by radius for ``stationary``),
the EMA step and the rescaled copy the defense reads; the perturbations' source (PGD, gradients) is not included.
The stationary Sigma's PSD projection (``psd: project``), which the first Sigma g after an update computes, is timed
on its own.
Each figure is the median of ``--repeats`` runs after a warm-up. Target (issue 10): the stationary update alone at
most 10% of a clean step when it updates every step.

    python bench/covariance_cost.py                 # CPU
    python bench/covariance_cost.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from advtrain.callbacks import CovarianceTracker  # noqa: E402
from advtrain.callbacks.covariance import make_covariance  # noqa: E402
from advtrain.defenses import Standard  # noqa: E402
from advtrain.networks import CIFAR10_MEAN, CIFAR10_STD, CarliniCNN  # noqa: E402
from bench.results_file import RESULTS, write_results  # noqa: E402
from bench.step_cost import timed  # noqa: E402

SHAPE = (3, 32, 32)


def tracker(representation: str, device: torch.device) -> CovarianceTracker:
    """A tracker as its setup leaves it (scale "data", a typical CIFAR-10 mean variance), on ``device``."""
    tracker = CovarianceTracker(source="defense", representation=representation)
    tracker.estimate = make_covariance(representation, SHAPE, device=device)
    tracker.target = torch.tensor(0.06, device=device)
    tracker.covariance = tracker.estimate.scaled_to(tracker.target)
    tracker.updates = 1  # past the first update: the steady-state EMA step
    return tracker


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "covariance_cost.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    network = CarliniCNN("cifar", mean=CIFAR10_MEAN, std=CIFAR10_STD).to(device)
    defense = Standard(network=network)
    defense.train()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    x = torch.rand(args.batch_size, *SHAPE, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    xi = (8 / 255) * torch.randn(args.batch_size, *SHAPE, device=device).sign()
    g = torch.randn(args.batch_size, *SHAPE, device=device)

    def clean_step():
        optimizer.zero_grad(set_to_none=True)
        defense.defense_loss(x, y, 0).loss.backward()
        optimizer.step()

    seconds = {"clean_step": timed(clean_step, device, args.repeats)}
    for representation in ("stationary", "full"):
        tr = tracker(representation, device)
        seconds[f"update_{representation}"] = timed(lambda tr=tr: tr.observe(xi), device, args.repeats)
    stationary = tracker("stationary", device).covariance
    stationary.functions.copy_(torch.rand_like(stationary.functions))
    for method in ("fft", "conv"):
        stationary.method = method
        stationary._changed()
        seconds[f"matvec_stationary_{method}"] = timed(lambda: stationary.matvec(g), device, args.repeats)
    stationary.method = "fft"

    def project():  # what the first Sigma g after an update adds: the PSD projection of the new Sigma
        stationary._changed()
        stationary.psd_change()

    seconds["psd_projection"] = timed(project, device, args.repeats)
    full = tracker("full", device).covariance
    seconds["matvec_full"] = timed(lambda: full.matvec(g), device, args.repeats)

    ratios = {
        "update_stationary_vs_clean": seconds["update_stationary"] / seconds["clean_step"],
        "update_full_vs_clean": seconds["update_full"] / seconds["clean_step"],
        "matvec_fft_vs_clean": seconds["matvec_stationary_fft"] / seconds["clean_step"],
        "matvec_conv_vs_clean": seconds["matvec_stationary_conv"] / seconds["clean_step"],
        "matvec_conv_vs_fft": seconds["matvec_stationary_conv"] / seconds["matvec_stationary_fft"],
        "psd_projection_vs_clean": seconds["psd_projection"] / seconds["clean_step"],
    }
    for name, value in seconds.items():
        print(f"{name:>24}: {value * 1000:9.2f} ms")
    print("ratios: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()))
    result = {"batch_size": args.batch_size, "shape": list(SHAPE), "repeats": args.repeats,
              "network": "CarliniCNN(cifar)", "optimizer": "Adam", "seconds": seconds, "ratios": ratios,
              "target": {"update_stationary_vs_clean": 0.10}}
    return write_results(args.out, result, device)


if __name__ == "__main__":
    main()
