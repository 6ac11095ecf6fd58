"""``advtrain transfer``: transfer matrices (the SGR paper's): adversarial examples crafted on each
source checkpoint, evaluated on every target checkpoint.

    advtrain transfer -c configs/mnist/pgd_at.yaml --checkpoints runs/a/.../best.ckpt runs/b/.../best.ckpt \\
        --attack '{"attack": "pgd", "eps": 0.3, "steps": 40, "step": 0.01}' --examples transfer_examples

The config gives the network architecture (shared by all checkpoints) and the data. Examples crafted
on a source are saved to ``--examples/<source>.pt`` (inputs, labels, setting, source hash) and reused
when the file is there, so a new target costs only its forward passes. The diagonal is the white-box
attack. An example counts as robust when the target classifies it correctly both clean and attacked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml
from torch import nn

from advtrain.attacks import AttackSetting, seeded_generator
from advtrain.evaluation import Accuracy, is_randomized, load_network, model_hash
from advtrain.evaluation import craft as craft_batch


def short_names(checkpoints: list[str]) -> list[str]:
    """The shortest distinct path suffixes, without the .ckpt suffix and 'checkpoints' folders:
    runs/demo/pgd_at/version_0/checkpoints/last.ckpt -> pgd_at/version_0/last."""
    parts = [[p for p in Path(c).with_suffix("").parts if p != "checkpoints"] for c in checkpoints]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(c) for c in checkpoints]


def batches(datamodule, limit: int | None, batch_size: int, device):
    dataset = datamodule.eval_dataset("test")
    n = min(len(dataset), limit or len(dataset))
    for start in range(0, n, batch_size):
        index = list(range(start, min(start + batch_size, n)))
        items = dataset.__getitems__(index) if hasattr(dataset, "__getitems__") else \
            torch.utils.data.default_collate([dataset[i] for i in index])
        x, y = datamodule.preprocess(tuple(t.to(device) for t in items), train=False)
        yield x, y


def craft(network: nn.Module, datamodule, setting: AttackSetting, limit, batch_size, device, seed: int) -> dict:
    xs, ys = [], []
    for batch_idx, (x, y) in enumerate(batches(datamodule, limit, batch_size, device)):
        generator = seeded_generator(device, seed, batch_idx)
        xs.append(craft_batch(setting, network, x, y, generator,
                              tuple(getattr(datamodule, "input_bounds", (0.0, 1.0)))).cpu())
        ys.append(y.cpu())
    return {"x_adv": torch.cat(xs), "y": torch.cat(ys), "setting": setting.as_dict()}


@torch.no_grad()
def accuracy(network: nn.Module, x_clean: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, batch_size,
             device) -> Accuracy:
    """Robust accuracy of ``network`` on crafted examples (correct both clean and attacked)."""
    correct = 0
    for start in range(0, len(y), batch_size):
        sl = slice(start, start + batch_size)
        yb = y[sl].to(device)
        clean_ok = network(x_clean[sl].to(device)).argmax(1) == yb
        adv_ok = network(x_adv[sl].to(device)).argmax(1) == yb
        correct += int((clean_ok & adv_ok).sum())
    return Accuracy.counted(correct, len(y))


def transfer_matrix(template: nn.Module, datamodule, checkpoints: list[str], setting: AttackSetting,
                    examples_dir: Path | None, limit=None, batch_size=256, device="cpu", seed=0) -> dict:
    names = short_names(checkpoints)
    networks = [load_network(template, c).to(device) for c in checkpoints]
    clean = torch.cat([x.cpu() for x, _ in batches(datamodule, limit, batch_size, device)])
    for name, net in zip(names, networks):
        if is_randomized(net, clean[:8].to(device)):
            raise ValueError(f"{name}: the network is randomized; a transfer matrix from single forward passes "
                             "would not be trustworthy (use advtrain test with evaluation.draws)")
    matrix = []
    for name, source, ckpt in zip(names, networks, checkpoints):
        path = None if examples_dir is None else Path(examples_dir) / (name.replace("/", "__") + ".pt")
        digest = model_hash(source)
        saved = torch.load(path, weights_only=True) if path is not None and path.exists() else None
        if saved is None or saved.get("source_hash") != digest or saved["setting"] != setting.as_dict() \
                or len(saved["y"]) != len(clean):
            saved = {**craft(source, datamodule, setting, limit, batch_size, device, seed), "source_hash": digest,
                     "source": str(ckpt)}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(saved, path)
        row = [accuracy(target, clean, saved["x_adv"], saved["y"], batch_size, device).accuracy
               for target in networks]
        matrix.append(row)
    return {"sources": names, "targets": names, "checkpoints": [str(c) for c in checkpoints],
            "setting": setting.as_dict(), "name": setting.name, "n": len(clean), "accuracy": matrix}


def markdown(result: dict) -> str:
    header = "| crafted on \\ evaluated on | " + " | ".join(result["targets"]) + " |"
    lines = [f"Transfer matrix, {result['name']}, n={result['n']} (accuracy %, diagonal = white-box)", "",
             header, "|" + "---|" * (len(result["targets"]) + 1)]
    for source, row in zip(result["sources"], result["accuracy"]):
        lines.append(f"| {source} | " + " | ".join(f"{100 * a:.2f}" for a in row) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="advtrain transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", required=True, help="config(s) naming network and data")
    parser.add_argument("--checkpoints", nargs="+", required=True, help="checkpoints (sources and targets)")
    parser.add_argument("--attack", required=True, help='the setting, YAML/JSON: {"attack": "pgd", "eps": "8/255"}')
    parser.add_argument("--examples", default=None, help="folder to save / reuse crafted examples")
    parser.add_argument("--limit", type=int, default=None, help="first N test examples only")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the matrix as JSON here")
    args = parser.parse_args(argv)
    try:
        spec = yaml.safe_load(args.attack)
        setting = AttackSetting(**spec).expand()
    except (TypeError, ValueError, yaml.YAMLError) as error:
        parser.error(f"--attack: {error}")
    if len(setting) != 1:
        parser.error("--attack: give one budget (eps), not a list")
    from advtrain.cli import AdvtrainCLI

    cli_args = [a for c in args.config for a in ("-c", c)] + ["--trainer.logger=false"]
    cli = AdvtrainCLI(args=cli_args, run=False)
    datamodule = cli.datamodule
    datamodule.setup("test")
    try:
        result = transfer_matrix(cli.model.network, datamodule, args.checkpoints, setting[0],
                                 Path(args.examples) if args.examples else None, args.limit, args.batch_size,
                                 torch.device(args.device), args.seed)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as error:  # a checkpoint that is not this one's
        parser.error(f"{type(error).__name__}: {error}".replace("\n", " "))
    print(markdown(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return result
