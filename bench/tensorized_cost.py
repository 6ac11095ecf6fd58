"""Cost of a forward+backward of the tensorized ResNet-18 relative to the plain one (CIFAR-10 shape).

The tensorized network rebuilds every conv and linear weight from its Tucker core and factors once per forward
(with a fresh fixed-shape mask when theta < 1; a conv on feature maps with few positions leaves its channel modes
out of the kernel and applies their factors as 1x1 convolutions, see networks/tucker.py). That extra cost hardly
depends on the batch size and weighs more at a small batch: the benchmark measures every batch size of
``--batch-size`` (default 128 and 32) in the same run, one block of interleaved rounds per batch size. At batch
128 the tensorized network should stay within 1.15x of the plain one on the CPU. Also times theta = 1 (no masks)
to separate the reconstruction from the masking, and the reconstruction of every weight alone (``weight``).
Prints the ratios and writes them as JSON (``--out``): ``ratios`` and ``seconds`` are those of the first batch
size (``batch_size``), ``runs`` holds every batch size's.

    python bench/tensorized_cost.py                                  # CPU, batch 128 and 32
    python bench/tensorized_cost.py --batch-size 64
    python bench/tensorized_cost.py --device cuda --bf16 --channels-last

Theory (multiply-adds): rebuilding a full-rank 512 x 512 x 3 x 3 kernel costs two 512^3 x 9 mode products
(2.4 G), about 9.5 G for all of ResNet-18, against 71.7 G for a batch-128 forward; the backward of the
reconstruction costs about twice its forward, so the ratio is about (3 x 71.7 + 3 x 9.5) / (3 x 71.7) = 1.13 at
batch 128 and 1 + 9.5 / 17.9 = 1.53 at batch 32 (less where channel modes are left to 1x1 convolutions).

On a 2-core CPU with glibc's malloc, the batch-128 steps spend a large and variable part of their time in page
faults (fresh pages for the activations; the plain step took 1.2 to 1.7 s in different processes on the benchmark
machine): compare ratios from one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advtrain.networks import ResNet18, keep_probability, tensorize  # noqa: E402
from advtrain.networks.tucker import tucker_layers  # noqa: E402
from bench.results_file import RESULTS, write_results  # noqa: E402
from bench.step_cost import timed  # noqa: E402

STEPS = ("plain", "tensorized", "tensorized_theta1")  # forward+backward, timed at every batch size


def ratios(seconds: dict) -> dict:
    return {"tensorized_vs_plain": seconds["tensorized"] / seconds["plain"],
            "tensorized_theta1_vs_plain": seconds["tensorized_theta1"] / seconds["plain"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[128, 32],
                        help="one or more batch sizes, all measured in the same interleaved rounds")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--theta", type=float, default=0.9)
    parser.add_argument("--rank", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "tensorized_cost.json"))
    args = parser.parse_args(argv)
    batch_sizes = list(dict.fromkeys(args.batch_size))

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    plain = ResNet18(num_classes=10)
    tensorized = tensorize(ResNet18(num_classes=10), rank=args.rank, theta=args.theta)
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    batches = {size: (torch.rand(size, 3, 32, 32, device=device).contiguous(memory_format=memory),
                      torch.randint(0, 10, (size,), device=device)) for size in batch_sizes}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def step(network, size):
        x, y = batches[size]
        network.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(network(x), y)
        loss.backward()

    def step_theta1(size):
        with keep_probability(tensorized, 1.0):
            step(tensorized, size)

    def reconstruct_no_grad():
        with torch.no_grad(), autocast:
            for layer in tucker_layers(tensorized):
                layer.weight  # noqa: B018 (the property rebuilds the weight)

    for network in (plain, tensorized):
        network.to(device, memory_format=memory).train()

    # One block per batch size, as a training run at that batch size would allocate, of interleaved rounds (plain,
    # tensorized, theta 1, and the reconstruction in the first block) after a warm-up; the median per kind. A machine
    # whose load or speed changes during a block then biases no kind against another.
    median = {}
    for block, size in enumerate(batch_sizes):
        kinds = {("plain", size): lambda s=size: step(plain, s),
                 ("tensorized", size): lambda s=size: step(tensorized, s),
                 ("tensorized_theta1", size): lambda s=size: step_theta1(s)}
        if block == 0:
            kinds["reconstruction_forward", None] = reconstruct_no_grad
        rounds = {kind: [] for kind in kinds}
        for fn in kinds.values():
            timed(fn, device, repeats=1)  # warm-up (cudnn autotuning, oneDNN primitives, allocator)
        for _ in range(args.repeats):
            for kind, fn in kinds.items():
                rounds[kind].append(timed(fn, device, repeats=1, warmup=0))
        median |= {kind: statistics.median(times) for kind, times in rounds.items()}
    reconstruction = median["reconstruction_forward", None]

    runs = []
    for size in batch_sizes:
        seconds = {name: median[name, size] for name in STEPS}
        runs.append({"batch_size": size, "seconds": seconds, "ratios": ratios(seconds)})
    first = runs[0]
    result = {
        "batch_size": first["batch_size"], "batch_sizes": batch_sizes, "theta": args.theta, "rank": args.rank,
        "bf16": args.bf16, "channels_last": args.channels_last, "repeats": args.repeats,
        "seconds": {**first["seconds"], "reconstruction_forward": reconstruction},
        "ratios": first["ratios"], "runs": runs,
    }
    for run in runs:
        for key, value in run["ratios"].items():
            print(f"batch {run['batch_size']:<4d} {key:32s} {value:6.2f}x")
        print(f"batch {run['batch_size']:<4d} {'plain forward+backward':32s} {1000 * run['seconds']['plain']:6.1f} ms")
    print(f"{'reconstruction forward':43s} {1000 * reconstruction:6.1f} ms")
    return write_results(args.out, result, device)


if __name__ == "__main__":
    main()
