"""Cost of a forward+backward of the tensorized ResNet-18 relative to the plain one (CIFAR-10 shape).

The tensorized network rebuilds every conv and linear weight from its Tucker core and factors once per forward
(with a fresh fixed-shape mask when theta < 1), so its extra cost is independent of the batch size; at batch 128
it should stay within 1.3x of the plain network. Also times theta = 1 (no masks) to separate the reconstruction
from the masking, and the reconstruction alone. Prints the ratios and writes them as JSON (``--out``).

    python bench/tensorized_cost.py                                  # CPU, batch 128
    python bench/tensorized_cost.py --device cuda --bf16 --channels-last

Theory (multiply-adds): rebuilding a full-rank 512 x 512 x 3 x 3 kernel costs two 512^3 x 9 mode products
(2.4 G), about 9.5 G for all of ResNet-18, against 71.7 G for a batch-128 forward; the backward of the
reconstruction costs about twice its forward, so the ratio is about (3 x 71.7 + 3 x 9.5) / (3 x 71.7) = 1.13x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step_cost import timed  # noqa: E402
from networks import ResNet18, keep_probability, tensorize  # noqa: E402
from networks.tucker import tucker_layers  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--theta", type=float, default=0.9)
    parser.add_argument("--rank", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tensorized_cost.json"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    plain = ResNet18(num_classes=10)
    tensorized = tensorize(ResNet18(num_classes=10), rank=args.rank, theta=args.theta)
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.rand(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def step(network):
        network.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(network(x), y)
        loss.backward()

    def reconstruct_all():
        with autocast:
            for layer in tucker_layers(tensorized):
                layer.weight  # noqa: B018 (the property rebuilds the weight)

    for network in (plain, tensorized):
        network.to(device, memory_format=memory).train()

    def step_theta1():
        with keep_probability(tensorized, 1.0):
            step(tensorized)

    def reconstruct_no_grad():
        with torch.no_grad():
            reconstruct_all()

    # Interleaved rounds (plain, tensorized, theta 1, reconstruction), median per kind: a machine whose load
    # changes during the run then biases no kind against another.
    kinds = {"plain": lambda: step(plain), "tensorized": lambda: step(tensorized),
             "tensorized_theta1": step_theta1, "reconstruction_forward": reconstruct_no_grad}
    rounds = {name: [] for name in kinds}
    for fn in kinds.values():
        timed(fn, device, repeats=1)  # warm-up (cudnn autotuning, allocator)
    for _ in range(args.repeats):
        for name, fn in kinds.items():
            rounds[name].append(timed(fn, device, repeats=1, warmup=0))
    seconds = {name: statistics.median(times) for name, times in rounds.items()}

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": args.batch_size, "theta": args.theta, "rank": args.rank, "bf16": args.bf16,
        "channels_last": args.channels_last, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "seconds": seconds,
        "ratios": {"tensorized_vs_plain": seconds["tensorized"] / seconds["plain"],
                   "tensorized_theta1_vs_plain": seconds["tensorized_theta1"] / seconds["plain"]},
    }
    for key, value in result["ratios"].items():
        print(f"{key:32s} {value:6.2f}x")
    print(f"{'reconstruction forward':32s} {1000 * seconds['reconstruction_forward']:6.1f} ms "
          f"(plain forward+backward {1000 * seconds['plain']:.1f} ms)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
