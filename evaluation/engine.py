"""The evaluation loop's parts: which attacks run on which network, one batch attacked and scored, the per-batch
cache that makes an interrupted evaluation resumable, DDP sharding, and the per-example totals.

Nothing here knows Lightning: the callback (``advtrain.callbacks.RobustnessEvaluation``) hands in batches and a
``reduce`` (sum across processes) and gets plain tensors back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from advtrain.attacks import AttackSetting, seeded_generator, stream_seed
from advtrain.attacks.diagnostics import collecting_reports
from advtrain.attacks.metrics import METRICS

from .autoattack_checks import batch_counts, diagnostic_keys, is_autoattack
from .threat import craft

NETWORK_STREAM = -1  # the stream index of a randomized network's own draws (attack runs are 0, 1, ...)


class TransferSource(NamedTuple):
    """Where a transfer run's examples come from, and the white-box setting of the suite it is compared with."""

    source: str
    label: str
    white_box_index: int


class Run(NamedTuple):
    """One attack setting, the network its examples are crafted on (the evaluated one, or a surrogate), and its
    role: ``suite`` (white-box), ``transfer`` (then ``transfer`` says from where) or ``sanity``."""

    setting: AttackSetting
    source: nn.Module
    role: str = "suite"
    transfer: TransferSource | None = None


def plan_runs(settings: list[AttackSetting], network: nn.Module, surrogates: list[tuple[str, nn.Module]],
              theta_one: bool, sanity_settings: list[AttackSetting]) -> list[Run]:
    """The white-box suite on ``network``; every setting again from each surrogate checkpoint and, with
    ``theta_one``, from the same network at theta = 1 (settings already omniscient are that attack); then the
    sanity runs."""
    runs = [Run(s, network) for s in settings]
    for path, surrogate in surrogates:
        runs += [Run(s, surrogate, "transfer", TransferSource(path, Path(path).stem, j))
                 for j, s in enumerate(settings)]
    if theta_one:
        runs += [Run(replace(s, omniscient=True), network, "transfer",
                     TransferSource("theta=1 (same network, randomness off)", "theta=1", j))
                 for j, s in enumerate(settings) if not s.omniscient]
    return runs + [Run(s, network, "sanity") for s in sanity_settings]


def metric_keys(runs: list[Run]) -> list[tuple[int, str]]:
    """(run index, metric name) for every metric a run's attack reports besides accuracy."""
    return [(i, m) for i, run in enumerate(runs) for m in run.setting.spec.metrics]


def correct(network: nn.Module, x: Tensor, y: Tensor, draws: int) -> Tensor:
    """(draws, B) bool: correct in each forward pass."""
    with torch.no_grad():
        return torch.stack([network(x).argmax(1) == y for _ in range(draws)])


def evaluate_batch(network: nn.Module, runs: list[Run], x: Tensor, y: Tensor, batch_idx: int, draws: int,
                   seed: int, bounds: tuple[float, float], on_run: Callable[[int], None] | None = None) -> dict:
    """Attack one batch with every run and score it over ``draws`` forward passes.

    Run i's random starts come from a generator seeded by (seed, i, batch_idx), so any process attacking
    this batch gets the same examples. Deterministic network: robust = correct clean and attacked. Randomized:
    the clean and the attacked forward are independent draws, so requiring both would count the randomness
    twice (accuracy at eps 0 would fall below clean accuracy); a draw counts as robust when it classifies the
    adversarial input correctly. ``on_run(i)`` is called before run i starts (progress reporting)."""
    # a randomized network draws its randomness (Tucker masks, dropout) from the global generators: seeded by the
    # batch here, so any process attacking this batch at any time (a resumed evaluation, another DDP rank) draws
    # the same, and the caller's generators are left where they were
    cuda = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        network_seed = stream_seed(seed, NETWORK_STREAM, batch_idx)
        torch.random.default_generator.manual_seed(network_seed)
        for device in cuda:  # this device only: fork_rng restores no other
            torch.cuda.default_generators[device.index or 0].manual_seed(network_seed)
        return _evaluate_batch(network, runs, x, y, batch_idx, draws, seed, bounds, on_run)


def _evaluate_batch(network, runs, x, y, batch_idx, draws, seed, bounds, on_run) -> dict:
    clean_ok = correct(network, x, y, draws)
    robust, seconds, metrics, diagnostics = [], [], {}, {}
    for i, run in enumerate(runs):
        setting = run.setting
        if on_run is not None:
            on_run(i)
        t0 = time.perf_counter()
        generator = seeded_generator(x.device, seed, i, batch_idx)
        with collecting_reports() as reports:  # AutoAttack's per-stage counts, for its official checks
            x_adv = craft(setting, run.source, x, y, generator, bounds)
        if is_autoattack(run):
            diagnostics.update(batch_counts(i, run, reports))
        adv_ok = correct(network, x_adv, y, draws)
        robust.append(adv_ok if draws > 1 else clean_ok & adv_ok)
        for name in setting.spec.metrics:
            metrics[f"{i}:{name}"] = METRICS[name].per_example(x, x_adv).cpu()
        seconds.append(time.perf_counter() - t0)
    # (S, draws, B) -> per example: number of draws correct; per draw: number of examples correct
    robust = torch.stack(robust) if robust else torch.zeros(0, draws, len(y), dtype=torch.bool, device=x.device)
    return {"clean": clean_ok.sum(0).cpu(), "robust": robust.sum(1).cpu(),
            "clean_per_draw": clean_ok.sum(1).cpu(), "robust_per_draw": robust.sum(2).cpu(),
            "seconds": torch.tensor(seconds, dtype=torch.float64), "metrics": metrics, "diagnostics": diagnostics}


def _whole_batch(batch):
    """Collate for datasets whose ``__getitems__`` already returns a whole batch."""
    return batch


def batch_loader(dataset, batches: list[list[int]], num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A loader of exactly ``batches`` (lists of indices) of ``dataset``: in-memory datasets hand out whole batches
    (``__getitems__``); file datasets go through default collate."""
    inner = dataset.dataset if isinstance(dataset, Subset) else dataset
    collate = _whole_batch if hasattr(inner, "__getitems__") else None
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin_memory)


def own_batches(n_batches: int, rank: int, world: int) -> list[int]:
    """Under DDP, rank r attacks batches r, r + W, r + 2W, ... of the one-process batching."""
    return list(range(rank, n_batches, world))


def fingerprint(settings: list[AttackSetting], surrogates: list[str], seed: int, split: str, n: int,
                batch_size: int, draws: int, model: str, precision: str = "32") -> str:
    """What the saved batches depend on: a rerun with anything else changed starts afresh (a bf16 evaluation is
    never completed by a float32 one; float32 keeps the fingerprints it had before precision was an option, and
    a suite without AutoAttack those it had before AutoAttack's batches saved its stage counts)."""
    counted = any(s.attack == "autoattack" for s in settings)
    key = json.dumps({"settings": [s.as_dict() for s in settings], "surrogates": surrogates, "seed": seed,
                      "split": split, "n": n, "batch_size": batch_size, "draws": draws, "model": model,
                      **({"precision": precision} if precision != "32" else {}),
                      **({"autoattack_counts": 1} if counted else {})}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class BatchCache:
    """Finished batches on disk, ``<root>/<fingerprint>/b<index>.pt``: an interrupted evaluation reuses them."""

    def __init__(self, root: Path, fingerprint: str):
        self.root, self.folder = Path(root), Path(root) / fingerprint

    def _file(self, batch_idx: int) -> Path:
        return self.folder / f"b{batch_idx:06d}.pt"

    def has(self, batch_idx: int) -> bool:
        return self._file(batch_idx).exists()

    def save(self, batch_idx: int, result: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self._file(batch_idx).with_suffix(".partial")
        torch.save(result, partial)
        os.replace(partial, self._file(batch_idx))  # a process killed while writing leaves no truncated batch

    def load(self, batch_idx: int) -> dict:
        return torch.load(self._file(batch_idx), weights_only=True)

    def remove(self) -> None:
        """Delete this evaluation's batches, and the cache folder once no other evaluation's are left."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


@dataclass
class Tally:
    """Per-example totals of one evaluation, filled batch by batch and summed across processes."""

    n: int
    runs: int
    draws: int
    metric_keys: list[tuple[int, str]] = field(default_factory=list)
    diagnostic_keys: list[tuple[int, str, int]] = field(default_factory=list)

    def __post_init__(self):
        self.clean = torch.zeros(self.n, dtype=torch.int64)
        self.robust = torch.zeros(self.runs, self.n, dtype=torch.int64)
        self.clean_per_draw = torch.zeros(self.draws, dtype=torch.int64)
        self.robust_per_draw = torch.zeros(self.runs, self.draws, dtype=torch.int64)
        self.seconds = torch.zeros(self.runs, dtype=torch.float64)
        self.metrics = {key: torch.zeros(self.n, dtype=torch.float64) for key in self.metric_keys}
        # counts summed over batches (AutoAttack's stages): (run, name) -> (length,)
        self.diagnostics = {(i, name): torch.zeros(length, dtype=torch.int64)
                            for i, name, length in self.diagnostic_keys}

    @classmethod
    def for_runs(cls, n: int, runs: list[Run], draws: int) -> Tally:
        """Totals for ``runs`` over ``n`` examples: their metrics and AutoAttack's stage counts included."""
        return cls(n, len(runs), draws, metric_keys(runs), diagnostic_keys(runs))

    def add(self, index: list[int], result: dict) -> None:
        self.clean[index] = result["clean"]
        self.robust[:, index] = result["robust"]
        self.clean_per_draw += result["clean_per_draw"]
        self.robust_per_draw += result["robust_per_draw"]
        self.seconds += result["seconds"]
        for i, name in self.metric_keys:
            self.metrics[i, name][index] = result["metrics"][f"{i}:{name}"]
        for i, name in self.diagnostics:
            self.diagnostics[i, name] += result["diagnostics"][f"{i}:{name}"]

    def reduce(self, reduce: Callable[[Tensor], Tensor]) -> None:
        """Sum every total across processes (each example belongs to one process; the others hold zeros)."""
        for name in ("clean", "robust", "clean_per_draw", "robust_per_draw", "seconds"):
            setattr(self, name, reduce(getattr(self, name)))
        self.metrics = {key: reduce(values) for key, values in self.metrics.items()}
        self.diagnostics = {key: reduce(values) for key, values in self.diagnostics.items()}
