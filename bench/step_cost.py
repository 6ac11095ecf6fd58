"""Cost of one adversarial training step relative to a clean step, and our PGD against torchattacks.

ResNet-18 at CIFAR-10 shape. Each step is zero_grad + the defense's loss (attack included) + backward
+ SGD step, timed as the median of ``--repeats`` runs after a warm-up. Prints the ratios and writes
them as JSON (``--out``).

    python bench/step_cost.py                       # CPU, batch 32
    python bench/step_cost.py --device cuda --batch-size 128 --bf16 --channels-last

NuAT and NuAT2 run with the settings of their configs (``NUAT_CONFIGS``: eps, start_scale, lambda_max as the
final lambda, attack_steps, nuclear_every; NuAT's defaults for what a config leaves out), recorded in the JSON
under ``settings``. With ``nuclear_every = n`` one timing covers n consecutive minibatches (the nuclear term in
the attack on the last of them, as in training) and counts as n steps. The network is ResNet-18 for all.

Theory for PGD-10 with input-only gradients: a clean step is about 3 forward-equivalents (forward +
backward with weight gradients), an attack iteration about 2 (forward + input-only backward), so
(10 * 2 + 3) / 3 ~ 7.7 clean steps; with loss.backward() in the attack it is (10 * 3 + 3) / 3 = 11. NuAT: a
clean forward+backward (3), one attack iteration (2) and the adversarial forward+backward (3): 8 / 3 ~ 2.7,
plus two small SVDs (B x 10) on the minibatches whose attack uses the nuclear term; NuAT2 one more attack
iteration: ~3.3.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from advtrain.attacks import attack_mode, pgd  # noqa: E402
from advtrain.defenses import PGDAT, TRADES, NuAT, Standard  # noqa: E402
from advtrain.networks import ResNet18  # noqa: E402
from bench.results_file import RESULTS, write_results  # noqa: E402

NUAT_CONFIGS = {"nuat": "configs/cifar10/nuat.yaml", "nuat2": "configs/cifar10/nuat2_wrn.yaml"}
NUAT_KEYS = ("eps", "start_scale", "lambda_max", "attack_steps", "nuclear_every")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def nuat_settings(config: str) -> dict:
    """The cost-relevant NuAT arguments of ``config`` (relative to the repository), NuAT's defaults for the rest."""
    init_args = yaml.safe_load((ROOT / config).read_text())["model"]["init_args"]
    defaults = {name: parameter.default for name, parameter in inspect.signature(NuAT.__init__).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    return {"config": config, **{key: init_args[key] if key in init_args else defaults[key]
                                 for key in NUAT_KEYS if key in init_args or key in defaults}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "step_cost.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    network = ResNet18(num_classes=10).to(device)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    if args.channels_last:
        network = network.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    settings = {
        "clean": {},
        "pgd10": {"eps": "8/255", "attack": {"attack": "pgd", "steps": 10, "step": "2/255"}},
        "trades10": {"eps": "8/255", "attack": {"attack": "trades_kl", "steps": 10, "step": "2/255"}},
        "fgsm_rs": {"eps": "8/255", "attack": "fgsm_rs"},
        **{name: nuat_settings(config) for name, config in NUAT_CONFIGS.items()},
    }
    defenses = {
        "clean": Standard(network=network),
        "pgd10": PGDAT(network=network, **settings["pgd10"]),
        "trades10": TRADES(network=network, **settings["trades10"]),
        "fgsm_rs": PGDAT(network=network, **settings["fgsm_rs"]),
        **{name: NuAT(network=network, **{k: v for k, v in settings[name].items() if k != "config"})
           for name in NUAT_CONFIGS},
    }
    for name in NUAT_CONFIGS:  # outside a Trainer the ramp would say 0: time it at its final value
        defenses[name].current_lambda = lambda lam=settings[name]["lambda_max"]: lam
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    seconds = {}
    for name, defense in defenses.items():
        defense.train()
        cycle = getattr(defense, "nuclear_every", 1)  # NuAT: every minibatch of the nuclear term's period

        def step(defense=defense, cycle=cycle):
            for batch_idx in range(cycle):
                optimizer.zero_grad(set_to_none=True)
                with autocast:
                    loss = defense.defense_loss(x, y, batch_idx).loss
                loss.backward()
                optimizer.step()

        seconds[name] = timed(step, device, args.repeats) / cycle
        print(f"{name:>9}: {seconds[name] * 1000:8.1f} ms/step  ({seconds[name] / seconds['clean']:.2f}x clean)")

    import torchattacks

    ta_pgd = torchattacks.PGD(network, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True)

    def ours():
        with autocast, attack_mode(network):
            pgd(network, x, y, 8 / 255, step=2 / 255, steps=10)

    def theirs():
        with autocast:
            ta_pgd(x, y)

    network.eval()
    seconds["pgd10_attack_ours"] = timed(ours, device, args.repeats)
    seconds["pgd10_attack_torchattacks"] = timed(theirs, device, args.repeats)
    ratios = {
        "pgd10_vs_clean": seconds["pgd10"] / seconds["clean"],
        "trades10_vs_clean": seconds["trades10"] / seconds["clean"],
        "fgsm_rs_vs_clean": seconds["fgsm_rs"] / seconds["clean"],
        "nuat_vs_clean": seconds["nuat"] / seconds["clean"],
        "nuat2_vs_clean": seconds["nuat2"] / seconds["clean"],
        "pgd_ours_vs_torchattacks": seconds["pgd10_attack_ours"] / seconds["pgd10_attack_torchattacks"],
    }
    print(f"PGD-10 attack: ours {seconds['pgd10_attack_ours'] * 1000:.1f} ms, torchattacks "
          f"{seconds['pgd10_attack_torchattacks'] * 1000:.1f} ms")
    print("ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    result = {"batch_size": args.batch_size, "bf16": args.bf16, "channels_last": args.channels_last,
              "repeats": args.repeats, "network": "ResNet18", "settings": settings, "seconds": seconds,
              "ratios": ratios}
    return write_results(args.out, result, device)


if __name__ == "__main__":
    main()
