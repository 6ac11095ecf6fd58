"""Robustness evaluation: a suite of attacks run at test time (and optionally after fit)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from contextlib import ExitStack
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, Subset
from tqdm.auto import tqdm

from attacks import AttackSetting, attack_mode
from networks.binary import sign_surrogate
from networks.tucker import is_tensorized, randomness_off

from .sanity import LARGE_EPS, sanity_verdicts


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


def load_network(template: nn.Module, checkpoint: str | Path) -> nn.Module:
    """A copy of ``template`` with the network weights of a Lightning checkpoint (for an EMA run, the
    averaged weights), in eval mode."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    weights = {k[len("network."):]: v for k, v in state.items() if k.startswith("network.")}
    network = copy.deepcopy(template)
    network.load_state_dict(weights)
    return network.eval()


def with_version(setting: AttackSetting, randomized: bool) -> AttackSetting:
    """AutoAttack's version when the config leaves it open: ``rand`` for a randomized network."""
    if setting.attack == "autoattack" and setting.version is None:
        return replace(setting, version="rand" if randomized else "standard")
    return setting


def craft(setting: AttackSetting, source: nn.Module, x: Tensor, y: Tensor,
          generator: torch.Generator | None = None, bounds: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Adversarial examples for one batch under ``setting``'s threat model: BatchNorm and dropout in eval
    mode, the network's randomness off for an omniscient attacker (Tucker theta = 1), and the chosen
    surrogate gradient of sign() for binary layers."""
    with ExitStack() as stack:
        stack.enter_context(attack_mode(source))
        if setting.omniscient:
            stack.enter_context(randomness_off(source))
        if setting.surrogate is not None:
            stack.enter_context(sign_surrogate(source, setting.surrogate))
        return setting.run(source, x, y, generator=generator, bounds=bounds)


@torch.no_grad()
def is_randomized(network: nn.Module, x: Tensor) -> bool:
    """True when two forward passes of the same input differ (test-time randomness)."""
    return not torch.equal(network(x), network(x))


class RobustnessEvaluation(pl.Callback):
    """Measure clean and robust accuracy under a configurable suite of attacks.

    When it runs: at the end of ``advtrain test`` (``on_test_epoch_end``), and after ``fit`` too if
    ``after_fit`` is set. It loads the datamodule's ``split`` itself (``eval_dataset``), so every
    example is attacked exactly once: under DDP, rank r attacks batches r, r + W, r + 2W, ... of the
    one-process batching, each batch's random starts come from a generator seeded by (seed, setting,
    batch), and the per-example results are summed across ranks, so totals equal a one-process run
    example for example.

    An example counts as robust when it is classified correctly both clean and under the attack
    (AutoAttack's convention: robust accuracy can never exceed clean accuracy). For a randomized network
    each draw counts as robust when it classifies the adversarial input correctly (the clean forward is
    another, independent draw).

    Randomized networks (two forward passes of one input differ) are evaluated over ``draws`` forward
    passes of the clean and the adversarial inputs: the results give the mean accuracy over draws, its
    standard deviation and the worst case (robust in every draw), never one forward pass. Each setting
    records its ``eot_samples``; a setting whose gradients came from single draws (no EOT) on a randomized
    network is marked so in the JSON (``single_draw_gradient``), the markdown and the note. For a
    tensorized randomized network with ``sanity_checks``, every suite setting is also crafted on the same
    network at theta = 1 (the omniscient attacker) as a transfer row, and the sanity checks verify that
    this transfer attack is not stronger than the white-box one.

    Resumable: each finished batch is saved under ``<run dir>/<filename>_batches/<fingerprint>/``
    (the fingerprint covers the weights, the suite, the seed and the split); a rerun after a crash
    loads those and attacks only the missing batches. The folder is removed once the results are written.

    Sanity checks (``sanity_checks``): PGD at eps 0 and at eps 0.5 are run too, and the verdicts of
    :func:`callbacks.sanity.sanity_verdicts` go into the results and, when one fails, the log.

    Writes ``robustness.json`` (every setting with its accuracy, counts, seed, model hash, per-example
    outcomes, sanity verdicts) and ``robustness.md`` into the run directory, and ``robustness/<setting>``
    TensorBoard scalars.

    Args:
        attacks: the suite, e.g. ``[{attack: fgsm, eps: [2/255, 8/255]}, {attack: pgd, eps: 8/255,
            steps: 20, restarts: 5}]``; a list of budgets expands into one setting per budget.
        split: ``test`` or ``val``.
        after_fit: also evaluate when fit ends (on the final weights).
        batch_size: evaluation batch size (default: the datamodule's eval batch size).
        limit: evaluate only the first ``limit`` examples of the split (quick looks; not for papers).
        seed: seeds every attack's random start.
        draws: forward passes per input for randomized networks.
        sanity_checks: run and report the sanity checks.
        surrogates: checkpoints of the same architecture to craft transfer attacks on (every setting of
            the suite, evaluated on this model); the sanity checks then verify that no transfer attack is
            stronger than the white-box one.
        resume: reuse the saved batches of an interrupted evaluation.
        filename: stem of the JSON and markdown files.
    """

    def __init__(self, attacks: list[AttackSetting] | None = None, split: str = "test", after_fit: bool = False,
                 batch_size: int | None = None, limit: int | None = None, seed: int = 0, draws: int = 10,
                 sanity_checks: bool = True, surrogates: list[str] | None = None, resume: bool = True,
                 filename: str = "robustness"):
        self.attacks = [AttackSetting(**a) if isinstance(a, dict) else a for a in (attacks or [])]
        self.settings = [single for setting in self.attacks for single in setting.expand()]
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        for name, value in (("batch_size", batch_size), ("limit", limit)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or null), got {value}")
        if draws < 2:
            raise ValueError(f"draws must be >= 2 (randomized models are never judged by one forward pass), "
                             f"got {draws}")
        self.split, self.after_fit, self.batch_size = split, after_fit, batch_size
        self.limit, self.seed, self.draws, self.filename = limit, seed, draws, filename
        self.sanity_checks, self.resume, self.surrogates = sanity_checks, resume, list(surrogates or [])
        self.bounds = (0.0, 1.0)  # the datamodule's input range, read when the evaluation runs
        self.sanity_settings = self._sanity_settings()
        self.results: dict | None = None
        self.computed_batches: list[int] = []

    def _sanity_settings(self) -> list[AttackSetting]:
        """PGD at eps 0 and at half the input range (0.5 for [0, 1] images, 1.0 for [-1, 1] audio)."""
        if not self.sanity_checks:
            return []
        large = LARGE_EPS * (self.bounds[1] - self.bounds[0])
        return [AttackSetting("pgd", eps=0.0, steps=1).expand()[0],
                AttackSetting("pgd", eps=large, steps=20).expand()[0]]

    # ---- hooks ---------------------------------------------------------------------------------
    def on_test_epoch_end(self, trainer, pl_module):
        self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        if self.after_fit:
            self.evaluate(trainer, pl_module)

    # ---- the evaluation --------------------------------------------------------------------------
    def _dataset(self, trainer):
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "eval_dataset"):
            raise RuntimeError("RobustnessEvaluation needs an advtrain datamodule (one with eval_dataset "
                               "and preprocess); pass it as `data` in the config")
        dataset = datamodule.eval_dataset(self.split)
        if self.limit is not None and self.limit < len(dataset):
            dataset = Subset(dataset, range(self.limit))
        return dataset

    def _loader(self, trainer, dataset, batches) -> DataLoader:
        datamodule = trainer.datamodule
        inner = dataset.dataset if isinstance(dataset, Subset) else dataset
        # in-memory datasets hand out whole batches (__getitems__); file datasets go through default collate
        collate = _whole_batch if hasattr(inner, "__getitems__") else None
        return DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                          num_workers=getattr(datamodule, "num_workers", 0),
                          pin_memory=getattr(datamodule, "pin_memory", False))

    def _inputs(self, trainer, pl_module, batch):
        prepare = getattr(pl_module, "prepare_input", lambda x: x)
        batch = trainer.strategy.batch_to_device(batch, pl_module.device)
        x, y = trainer.datamodule.preprocess(batch, train=False)
        return prepare(x), y

    def _correct(self, network, x, y, draws: int) -> Tensor:
        """(draws, B) bool: correct in each forward pass."""
        with torch.no_grad():
            return torch.stack([network(x).argmax(1) == y for _ in range(draws)])

    def _runs(self, network, surrogates, theta_one: bool) -> tuple[list[tuple[AttackSetting, nn.Module]], list]:
        """(setting, network the examples are crafted on) for the white-box suite, the transfer attacks from
        each surrogate and from the same network at theta = 1 (``theta_one``; settings that are already
        omniscient are that attack), and the sanity runs; plus, per transfer run, (source, label, index of
        the white-box setting it is compared with)."""
        runs = [(s, network) for s in self.settings]
        transfer = []
        for path, surrogate in zip(self.surrogates, surrogates, strict=True):
            runs += [(s, surrogate) for s in self.settings]
            transfer += [(path, Path(path).stem, j) for j in range(len(self.settings))]
        if theta_one:
            indices = [j for j, s in enumerate(self.settings) if not s.omniscient]
            runs += [(replace(self.settings[j], omniscient=True), network) for j in indices]
            transfer += [("theta=1 (same network, randomness off)", "theta=1", j) for j in indices]
        return runs + [(s, network) for s in self.sanity_settings], transfer

    def _evaluate_batch(self, network, runs, x, y, batch_idx: int, draws: int) -> dict:
        clean_ok = self._correct(network, x, y, draws)
        robust, seconds = [], []
        for i, (setting, source) in enumerate(runs):
            t0 = time.perf_counter()
            generator = torch.Generator(device=x.device).manual_seed(
                (self.seed * 1_000_003 + i) * 1_000_003 + batch_idx)
            x_adv = craft(setting, source, x, y, generator, self.bounds)
            adv_ok = self._correct(network, x_adv, y, draws)
            # Deterministic: robust = correct clean and attacked. Randomized: the clean and the attacked forward
            # are independent draws, so requiring both would count the randomness twice (accuracy at eps 0
            # would fall below clean accuracy); a draw counts as robust when it classifies x_adv correctly.
            robust.append(adv_ok if draws > 1 else clean_ok & adv_ok)
            seconds.append(time.perf_counter() - t0)
        # (S, draws, B) -> per example: number of draws correct; per draw: number of examples correct
        robust = torch.stack(robust) if robust else torch.zeros(0, draws, len(y), dtype=torch.bool, device=x.device)
        return {"clean": clean_ok.sum(0).cpu(), "robust": robust.sum(1).cpu(),
                "clean_per_draw": clean_ok.sum(1).cpu(), "robust_per_draw": robust.sum(2).cpu(),
                "seconds": torch.tensor(seconds, dtype=torch.float64)}

    def _fingerprint(self, network_hash: str, n: int, batch_size: int, draws: int) -> str:
        key = json.dumps({"settings": [s.as_dict() for s in self.settings + self.sanity_settings],
                          "surrogates": self.surrogates, "seed": self.seed, "split": self.split, "n": n,
                          "batch_size": batch_size, "draws": draws, "model": network_hash}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    def on_batch_done(self, batch_idx: int) -> None:
        """Called after each attacked batch has been saved (a seam for progress reporting and tests)."""

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """Run the suite; return (and store in ``self.results``) the results on every rank."""
        network = pl_module.network
        dataset = self._dataset(trainer)
        self.bounds = tuple(float(b) for b in getattr(trainer.datamodule, "input_bounds", (0.0, 1.0)))
        self.sanity_settings = self._sanity_settings()
        n = len(dataset)
        batch_size = self.batch_size or getattr(trainer.datamodule, "eval_batch_size", None) or 128
        batches = list(BatchSampler(SequentialSampler(range(n)), batch_size, drop_last=False))
        rank, world = trainer.global_rank, trainer.world_size
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: all ranks
        surrogates = [load_network(network, path).to(pl_module.device) for path in self.surrogates]

        with torch.inference_mode(False), torch.enable_grad(), attack_mode(network), \
                trainer.precision_plugin.forward_context():
            # every rank probes batch 0 itself, so all take the same decision without communicating
            probe_x, _ = self._inputs(trainer, pl_module, next(iter(self._loader(trainer, dataset, batches[:1]))))
            randomized = is_randomized(network, probe_x)
            draws = self.draws if randomized else 1
            theta_one = randomized and self.sanity_checks and is_tensorized(network)
            runs, transfer_sources = self._runs(network, surrogates, theta_one)
            runs = [(with_version(s, randomized), source) for s, source in runs]
            S = len(runs)
            digest = model_hash(network)
            cache = out_dir / f"{self.filename}_batches" / self._fingerprint(digest, n, batch_size, draws)
            cache.mkdir(parents=True, exist_ok=True)
            clean = torch.zeros(n, dtype=torch.int64)
            robust = torch.zeros(S, n, dtype=torch.int64)
            clean_per_draw = torch.zeros(draws, dtype=torch.int64)
            robust_per_draw = torch.zeros(S, draws, dtype=torch.int64)
            seconds = torch.zeros(S, dtype=torch.float64)
            own = list(range(rank, len(batches), world))
            todo = [b for b in own if not (self.resume and (cache / f"b{b:06d}.pt").exists())]
            loader = self._loader(trainer, dataset, [batches[b] for b in todo])
            for batch_idx, batch in zip(todo, tqdm(loader, desc="robustness", leave=False,
                                                   disable=not trainer.is_global_zero)):
                x, y = self._inputs(trainer, pl_module, batch)
                result = self._evaluate_batch(network, runs, x, y, batch_idx, draws)
                torch.save(result, cache / f"b{batch_idx:06d}.pt")
                self.computed_batches.append(batch_idx)
                self.on_batch_done(batch_idx)
            for batch_idx in own:
                result = torch.load(cache / f"b{batch_idx:06d}.pt", weights_only=True)
                index = batches[batch_idx]
                clean[index] = result["clean"]
                robust[:, index] = result["robust"]
                clean_per_draw += result["clean_per_draw"]
                robust_per_draw += result["robust_per_draw"]
                seconds += result["seconds"]

        device = pl_module.device
        reduce = lambda t: trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu()  # noqa: E731
        clean, robust, seconds = reduce(clean), reduce(robust), reduce(seconds)
        clean_per_draw, robust_per_draw = reduce(clean_per_draw), reduce(robust_per_draw)
        self.results = self._summarize(trainer, pl_module, [s for s, _ in runs], clean, robust, clean_per_draw,
                                       robust_per_draw, seconds, draws, randomized, transfer_sources, digest)
        self._report(trainer, out_dir)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            shutil.rmtree(cache, ignore_errors=True)
        return self.results

    @staticmethod
    def _accuracy(per_example: Tensor, per_draw: Tensor, draws: int) -> dict:
        n = max(len(per_example), 1)
        per_draw_acc = per_draw.double() / n
        return {"correct": int((per_example == draws).sum()), "n": len(per_example),
                "accuracy": float(per_draw_acc.mean()),
                "accuracy_std": float(per_draw_acc.std()) if draws > 1 else 0.0,
                "accuracy_worst": float((per_example == draws).double().sum() / n)}

    def _summarize(self, trainer, pl_module, settings, clean, robust, clean_per_draw, robust_per_draw, seconds,
                   draws, randomized, transfer_sources, digest) -> dict:
        entries = [{**s.as_dict(), "name": s.name, **self._accuracy(r, d, draws), "seconds": round(float(t), 3)}
                   for s, r, d, t in zip(settings, robust, robust_per_draw, seconds)]
        if randomized:
            for e in entries:
                e["single_draw_gradient"] = e["eot_samples"] == 1 and not e["omniscient"]
        n_suite, n_transfer = len(self.settings), len(transfer_sources)
        attacks = entries[:n_suite]
        transfer = entries[n_suite:n_suite + n_transfer]
        sanity_runs = entries[n_suite + n_transfer:]
        for t, (source, label, j) in zip(transfer, transfer_sources, strict=True):
            t.update(surrogate=source, name=f"transfer[{label}] {attacks[j]['name']}",
                     white_box_accuracy=attacks[j]["accuracy"])
        clean_acc = self._accuracy(clean, clean_per_draw, draws)
        n = len(clean)
        verdicts = []
        if self.sanity_checks:
            noise = 2 * math.sqrt(0.25 / max(n * draws, 1)) if randomized else 0.0
            fractions = [{**a, "robust_fraction": (r.double() / draws).tolist()} for a, r in zip(attacks, robust)]
            verdicts = sanity_verdicts(clean_acc["accuracy"], fractions, sanity_runs[0]["accuracy"],
                                       sanity_runs[1]["accuracy"], tolerance=0.005 + noise, transfer=transfer)
        ckpt = getattr(trainer, "ckpt_path", None)
        results = {
            "split": self.split, "n": n, "seed": self.seed,
            "randomized": randomized, "draws": draws,
            "clean": clean_acc,
            "attacks": attacks,
            "transfer": transfer,
            "sanity": {"runs": sanity_runs, "verdicts": verdicts},
            "per_example": {"clean": clean.tolist(), **{a["name"]: r.tolist() for a, r in zip(attacks, robust)}},
            "model": type(pl_module).__name__, "network": type(pl_module.network).__name__,
            "model_hash": digest, "checkpoint": str(ckpt) if ckpt else None,
            "world_size": trainer.world_size, "global_step": trainer.global_step,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if randomized:
            no_eot = [a["name"] for a in attacks if a["single_draw_gradient"]]
            results["note"] = (f"randomized network: every accuracy is over {draws} forward passes (mean, std, "
                               "worst = robust in every draw)." +
                               (f" These settings attacked with single-draw gradients (no EOT), so they are upper "
                                f"bounds on robust accuracy: {', '.join(no_eot)}" if no_eot else
                                " Every attack averaged its gradients over draws (EOT)."))
        return results

    def _report(self, trainer, out_dir: Path) -> None:
        results = self.results
        randomized = results["randomized"]

        def cell(a):
            text = f"{100 * a['accuracy']:.2f}"
            return text + (f" ± {100 * a['accuracy_std']:.2f} (worst {100 * a['accuracy_worst']:.2f})"
                           if randomized else "")

        lines = ["| setting | accuracy | correct / n |", "|---|---|---|",
                 f"| clean | {cell(results['clean'])} | {results['clean']['correct']} / {results['n']} |"]
        lines += [f"| {a['name']}{' (no EOT)' if a.get('single_draw_gradient') else ''} | {cell(a)} | "
                  f"{a['correct']} / {a['n']} |" for a in results["attacks"] + results["transfer"]]
        table = "\n".join(lines) + (f"\n\n{results['note']}" if "note" in results else "")
        failed = [v for v in results["sanity"]["verdicts"] if not v["passed"]]
        rank_zero_info(f"\nRobustness ({results['model']}, {results['split']} split, n={results['n']}"
                       f"{', randomized: ' + str(results['draws']) + ' draws' if randomized else ''}):\n{table}")
        for v in failed:
            rank_zero_warn(f"sanity check {v['check']} failed: {v['detail']}. Likely cause: {v['likely_cause']}")
        if trainer.is_global_zero:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{self.filename}.json").write_text(json.dumps(results, indent=1))
            checks = "\n".join(f"- {'ok' if v['passed'] else 'FAILED'}: {v['check']}: {v['detail']}"
                               for v in results["sanity"]["verdicts"])
            (out_dir / f"{self.filename}.md").write_text(table + "\n" + (f"\nSanity checks:\n{checks}\n"
                                                                         if checks else ""))
            rank_zero_info(f"Robustness results written to {out_dir / (self.filename + '.json')}")
        if trainer.logger is not None:
            metrics = {"robustness/clean": results["clean"]["accuracy"]}
            metrics.update({f"robustness/{a['name']}": a["accuracy"] for a in results["attacks"]})
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
