"""Robustness evaluation: a suite of attacks run at test time (and optionally after fit)."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, Subset
from tqdm.auto import tqdm

from attacks import AttackSetting, attack_mode


def _whole_batch(batch):
    """Collate for datasets whose ``__getitems__`` already returns a whole batch."""
    return batch


def model_hash(network: nn.Module) -> str:
    """A short fingerprint of the weights and buffers that were evaluated."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class RobustnessEvaluation(pl.Callback):
    """Measure clean and robust accuracy under a configurable suite of attacks.

    When it runs: at the end of ``advtrain test`` (``on_test_epoch_end``), and after ``fit`` too if
    ``after_fit`` is set. It loads the datamodule's ``split`` itself (``eval_dataset``), so every
    example is attacked exactly once: under DDP, rank r attacks batches r, r + W, r + 2W, ... of the
    one-process batching, each batch's random starts come from a generator seeded by (seed, setting,
    batch), and the per-example results are summed across ranks, so totals equal a one-process run
    example for example.

    An example counts as robust when it is classified correctly both clean and under the attack
    (AutoAttack's convention: robust accuracy can never exceed clean accuracy).

    Writes ``robustness.json`` (every setting with its accuracy, counts, seed, model hash) and
    ``robustness.md`` into the run directory, and ``robustness/<setting>`` TensorBoard scalars.

    Args:
        attacks: the suite, e.g. ``[{attack: fgsm, eps: [2/255, 8/255]}, {attack: pgd, eps: 8/255,
            steps: 20, restarts: 5}]``; a list of budgets expands into one setting per budget.
        split: ``test`` or ``val``.
        after_fit: also evaluate when fit ends (on the final weights).
        batch_size: evaluation batch size (default: the datamodule's eval batch size).
        limit: evaluate only the first ``limit`` examples of the split (quick looks; not for papers).
        seed: seeds every attack's random start.
        filename: stem of the JSON and markdown files.
    """

    def __init__(self, attacks: list[AttackSetting] | None = None, split: str = "test", after_fit: bool = False,
                 batch_size: int | None = None, limit: int | None = None, seed: int = 0,
                 filename: str = "robustness"):
        self.attacks = [AttackSetting(**a) if isinstance(a, dict) else a for a in (attacks or [])]
        self.settings = [single for setting in self.attacks for single in setting.expand()]
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 (or null for the whole split), got {limit}")
        self.split, self.after_fit, self.batch_size = split, after_fit, batch_size
        self.limit, self.seed, self.filename = limit, seed, filename
        self.results: dict | None = None

    # ---- hooks ---------------------------------------------------------------------------------
    def on_test_epoch_end(self, trainer, pl_module):
        self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        if self.after_fit:
            self.evaluate(trainer, pl_module)

    # ---- the evaluation --------------------------------------------------------------------------
    def _shard(self, trainer) -> tuple[DataLoader, int, int]:
        """This rank's batches of the one-process batching, with their global batch indices.

        Returns the loader (batches b = rank, rank + W, ...), the batch size and the split's size.
        """
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "eval_dataset"):
            raise RuntimeError("RobustnessEvaluation needs an advtrain datamodule (one with eval_dataset "
                               "and preprocess); pass it as `data` in the config")
        dataset = datamodule.eval_dataset(self.split)
        if self.limit is not None and self.limit < len(dataset):
            dataset = Subset(dataset, range(self.limit))
        batch_size = self.batch_size or getattr(datamodule, "eval_batch_size", None) or 128
        batches = list(BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=False))
        own = batches[trainer.global_rank::trainer.world_size]
        inner = dataset.dataset if isinstance(dataset, Subset) else dataset
        # in-memory datasets hand out whole batches (__getitems__); file datasets go through default collate
        collate = _whole_batch if hasattr(inner, "__getitems__") else None
        workers = getattr(datamodule, "num_workers", 0)
        loader = DataLoader(dataset, batch_sampler=own, collate_fn=collate, num_workers=workers,
                            pin_memory=getattr(datamodule, "pin_memory", False))
        return loader, batch_size, len(dataset)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """Run the suite; return (and store in ``self.results``) the results on every rank."""
        network = pl_module.network
        prepare = getattr(pl_module, "prepare_input", lambda x: x)
        datamodule = trainer.datamodule
        loader, batch_size, n_total = self._shard(trainer)
        rank, world = trainer.global_rank, trainer.world_size
        device = pl_module.device
        # per-example outcome, -1 where another rank owns the example; summed over ranks at the end
        clean = torch.zeros(n_total, dtype=torch.int64, device=device)
        robust = torch.zeros(len(self.settings), n_total, dtype=torch.int64, device=device)
        timings = torch.zeros(len(self.settings), dtype=torch.float64)
        with torch.inference_mode(False), torch.enable_grad(), attack_mode(network), \
                trainer.precision_plugin.forward_context():
            for k, batch in enumerate(tqdm(loader, desc="robustness", disable=not trainer.is_global_zero,
                                           leave=False)):
                batch_idx = rank + k * world  # the batch's index in the one-process batching
                start = batch_idx * batch_size
                size = len(batch[1])
                batch = trainer.strategy.batch_to_device(batch, device)
                x, y = datamodule.preprocess(batch, train=False)
                x = prepare(x)
                with torch.no_grad():
                    clean_ok = network(x).argmax(1) == y
                clean[start:start + size] = clean_ok.long()
                for i, setting in enumerate(self.settings):
                    t0 = time.perf_counter()
                    generator = torch.Generator(device=device).manual_seed(
                        (self.seed * 1_000_003 + i) * 1_000_003 + batch_idx)
                    x_adv = setting.run(network, x, y, generator=generator)
                    with torch.no_grad():
                        adv_ok = network(prepare(x_adv)).argmax(1) == y
                    robust[i, start:start + size] = (clean_ok & adv_ok).long()
                    timings[i] += time.perf_counter() - t0
        clean = trainer.strategy.reduce(clean, reduce_op="sum")
        robust = trainer.strategy.reduce(robust, reduce_op="sum")
        timings = trainer.strategy.reduce(timings.to(device), reduce_op="sum").cpu()
        self.results = self._summarize(trainer, pl_module, clean.cpu(), robust.cpu(), timings)
        self._report(trainer, pl_module)
        return self.results

    def _summarize(self, trainer, pl_module, clean, robust, timings) -> dict:
        n = len(clean)
        ckpt = getattr(trainer, "ckpt_path", None)
        return {
            "split": self.split,
            "n": n,
            "seed": self.seed,
            "clean": {"correct": int(clean.sum()), "accuracy": float(clean.sum()) / max(n, 1)},
            "attacks": [
                {**s.as_dict(), "name": s.name, "correct": int(r.sum()), "n": n,
                 "accuracy": float(r.sum()) / max(n, 1), "seconds": round(float(t), 3)}
                for s, r, t in zip(self.settings, robust, timings)
            ],
            "per_example": {"clean": clean.tolist(),
                            **{s.name: r.tolist() for s, r in zip(self.settings, robust)}},
            "model": type(pl_module).__name__,
            "network": type(pl_module.network).__name__,
            "model_hash": model_hash(pl_module.network),
            "checkpoint": str(ckpt) if ckpt else None,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _report(self, trainer, pl_module) -> None:
        results = self.results
        lines = ["| setting | accuracy | correct / n |", "|---|---|---|",
                 f"| clean | {100 * results['clean']['accuracy']:.2f} | {results['clean']['correct']} / "
                 f"{results['n']} |"]
        for a in results["attacks"]:
            lines.append(f"| {a['name']} | {100 * a['accuracy']:.2f} | {a['correct']} / {a['n']} |")
        table = "\n".join(lines)
        rank_zero_info(f"\nRobustness ({results['model']}, {results['split']} split, n={results['n']}):\n{table}")
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: all ranks
        if trainer.is_global_zero:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{self.filename}.json").write_text(json.dumps(results, indent=1))
            (out_dir / f"{self.filename}.md").write_text(table + "\n")
            rank_zero_info(f"Robustness results written to {out_dir / (self.filename + '.json')}")
        if trainer.logger is not None:
            metrics = {"robustness/clean": results["clean"]["accuracy"]}
            metrics.update({f"robustness/{a['name']}": a["accuracy"] for a in results["attacks"]})
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
