"""Cost of one ADR training step relative to a PGD-AT step with the same attack, network and batch.

CNN-4C3F(64) (the Carlini & Wagner CIFAR CNN, z = its 3200-d flattened conv output) at CIFAR-10 shape, PGD-10
(eps 0.031, step 0.007, crafted in eval mode) for both; ADR with every term on (lc, smt, gc, gsmt, conf = 1, the
most expensive setting). Each step is zero_grad + the defense's loss (attack included) + backward + optimizer
step, timed as the median of ``--repeats`` runs after a warm-up; the two defenses alternate so that a change in
the machine's load hits both. Prints the ratio and writes it as JSON (``--out``).

    OMP_NUM_THREADS=2 python bench/adr_cost.py                 # CPU, batch 128
    python bench/adr_cost.py --device cuda

Theory: a PGD-AT step is 10 attack iterations (forward + input-only backward, ~2 forward-equivalents each) plus
the training forward + backward on x_a (~3): ~23. ADR adds the clean forward + backward (~3) and the terms
(the global ones are B x B pairs: a cdist over the 3200-d latents and a (B, 10) x (10, B) product), so
(23 + 3) / 23 ~ 1.13 plus the terms: the clean pass that the loss needs (0.5 CE(x), as the official code) sets
the floor, not the compactness terms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from advtrain.defenses import ADR, PGDAT  # noqa: E402
from advtrain.networks import CarliniCNN  # noqa: E402
from bench.results_file import RESULTS, write_results  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "adr_cost.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    network = CarliniCNN("cifar").to(device)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    attack = {"attack": "pgd", "steps": 10, "step": 0.007}
    terms = {"lc": 1.0, "smt": 1.0, "gc": 1.0, "gsmt": 1.0, "conf": 1.0}
    defenses = {"pgd_at": PGDAT(network=network, eps=0.031, attack=attack),
                "adr": ADR(network=network, eps=0.031, attack=attack, **terms)}
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)

    def step(defense):
        optimizer.zero_grad(set_to_none=True)
        defense.defense_loss(x, y, 0).loss.backward()
        optimizer.step()

    times = {name: [] for name in defenses}
    for defense in defenses.values():  # warm-up
        defense.train()
        step(defense)
    for _ in range(args.repeats):
        for name, defense in defenses.items():
            sync(device)
            t0 = time.perf_counter()
            step(defense)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    ratio = seconds["adr"] / seconds["pgd_at"]
    for name, s in seconds.items():
        print(f"{name:>7}: {s * 1000:8.1f} ms/step")
    print(f"adr_vs_pgd_at = {ratio:.3f} (target <= 1.10)")
    result = {"batch_size": args.batch_size, "repeats": args.repeats, "network": "CarliniCNN(cifar) = CNN-4C3F(64)",
              "latent_dim": network.latent_dim, "settings": {"attack": attack, "adr_terms": terms},
              "seconds": seconds, "all_seconds": times, "ratios": {"adr_vs_pgd_at": ratio}}
    return write_results(args.out, result, device)


if __name__ == "__main__":
    main()
