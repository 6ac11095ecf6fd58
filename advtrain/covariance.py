"""``advtrain covariance``: the covariance of a data set's inputs, saved for attacks and regularizers that take
one (the LRC attack's ``covariance:``, SGR's fixed Sigma).

    advtrain covariance -c configs/cifar10/standard.yaml --output data/cifar10_covariance.pt

The config names the datamodule; its training split (without augmentation) is read in batches and the (d, d)
covariance of the flattened inputs, in their natural range, is accumulated in float64 (sums of x and x x^T, so
memory is one d x d matrix, 75 MB for CIFAR-10) and saved with ``torch.save``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset


def data_covariance(datamodule, split: str = "train", limit: int | None = None, batch_size: int = 500) -> torch.Tensor:
    """The (d, d) float64 covariance (divided by n - 1) of the datamodule's ``split`` inputs, preprocessed
    without augmentation."""
    if split == "train":
        datamodule.setup("fit")
        dataset = datamodule.train_set
    else:
        dataset = datamodule.eval_dataset(split)
    n = min(len(dataset), limit or len(dataset))
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 examples, the {split} split gives {n}")
    total = outer = None
    # in-memory datasets hand out whole batches (__getitems__); file datasets go through default collate
    collate = (lambda batch: batch) if hasattr(dataset, "__getitems__") else None
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False, collate_fn=collate)
    for batch in loader:
        x, _ = datamodule.preprocess(batch, train=False)
        flat = x.flatten(1).double()
        total = flat.sum(0) if total is None else total + flat.sum(0)
        outer = flat.T @ flat if outer is None else outer + flat.T @ flat
    mean = total / n
    return (outer - n * torch.outer(mean, mean)) / (n - 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="advtrain covariance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", required=True, help="config(s) naming the data")
    parser.add_argument("--output", required=True, help="the .pt file to write (refuses to overwrite one)")
    parser.add_argument("--split", default="train", choices=["train", "val", "test"])
    parser.add_argument("--limit", type=int, default=None, help="first N examples only")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists():
        parser.error(f"--output {output} exists; remove it or choose another name")
    from advtrain.cli import AdvtrainCLI

    cli = AdvtrainCLI(args=[a for c in args.config for a in ("-c", c)] + ["--trainer.logger=false"], run=False)
    covariance = data_covariance(cli.datamodule, args.split, args.limit)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(covariance, output)
    print(f"covariance of {args.split} inputs ({covariance.shape[0]} x {covariance.shape[0]}, mean variance "
          f"{float(covariance.diagonal().mean()):.4g}) written to {output}", file=sys.stderr)
    return 0
