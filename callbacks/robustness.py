"""Robustness evaluation as a Lightning callback: a suite of attacks run at test time (and optionally after fit),
over the engine in ``evaluation/``."""

from __future__ import annotations

import functools
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, Subset
from tqdm.auto import tqdm

from advtrain.attacks import AttackSetting, attack_mode
from advtrain.evaluation import (
    LARGE_EPS,
    BatchCache,
    EvaluationResults,
    Run,
    Tally,
    batch_loader,
    check_threat_model,
    evaluate_batch,
    fingerprint,
    free_stem,
    is_randomized,
    load_network,
    markdown_table,
    model_hash,
    own_batches,
    plan_runs,
    scalars,
    summarize,
    with_version,
    write_results,
)
from advtrain.evaluation.autoattack_checks import suite_probe
from advtrain.evaluation.precision import check_precision, evaluation_precision
from advtrain.networks.randomness import declares_randomness

from .requeue import Requeue, stop_requested


class RobustnessEvaluation(pl.Callback):
    """Measure clean and robust accuracy under a configurable suite of attacks.

    When it runs: at the end of ``advtrain test``, and after ``fit`` too with ``after_fit``. It loads the
    datamodule's ``split`` itself, so every example is attacked exactly once: under DDP rank r attacks batches
    r, r + W, ... of the one-process batching with random starts seeded by (seed, setting, batch), and the
    per-example results are summed, so totals equal a one-process run example for example.

    An example is robust when it is classified correctly both clean and attacked (AutoAttack's convention). A
    randomized network is judged over ``draws`` forward passes (mean, std and worst case, never one pass); a
    setting attacked with single-draw gradients (no EOT) is marked as an upper bound, and a tensorized network
    is also attacked at theta = 1 (the omniscient attacker) as a transfer row. With ``sanity_checks``, PGD at
    eps 0 and at half the input range run too, and :mod:`advtrain.evaluation.sanity`'s verdicts go into the
    results. See docs/evaluation.md.

    Resumable: each finished batch is saved under ``<run dir>/<filename>_batches/<fingerprint>/`` (the
    fingerprint covers the weights, the suite, the seed and the split), and a rerun attacks only the others.

    Writes ``robustness-<checkpoint>.json`` (:class:`advtrain.evaluation.EvaluationResults`; ``robustness.json``
    without a checkpoint), the matching ``.md`` and ``robustness/<setting>`` TensorBoard scalars. A file holding
    another evaluation is never replaced: the new one goes to ``...-2.json``; only a rerun of the very same
    evaluation replaces its own file, and says so. ``results_path`` is the file written.

    Args:
        attacks: the suite, e.g. ``[{attack: fgsm, eps: [2/255, 8/255]}, {attack: pgd, eps: 8/255,
            steps: 20, restarts: 5}, {attack: deepfool}, {attack: lrc, eps: 0.1, zeta: 8}]``; a list of
            budgets expands into one setting per budget. Each entry is checked against its attack's row in
            ``advtrain.attacks.ATTACKS`` when the config is read (see ``advtrain.attacks.AttackSetting``).
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
        filename: stem of the JSON and markdown files (the checkpoint's name is appended).
        precision: ``32`` (float32, whatever precision training used: as the papers and the official AutoAttack
            evaluate) or ``bf16-mixed`` (bf16 autocast: faster on a GPU, but coarser gradients and logits make
            attacks weaker and numbers not comparable with float32 ones; recorded in the results and marked by
            ``advtrain report``).
    """

    def __init__(self, attacks: list[dict] | None = None, split: str = "test", after_fit: bool = False,
                 batch_size: int | None = None, limit: int | None = None, seed: int = 0, draws: int = 10,
                 sanity_checks: bool = True, surrogates: list[str] | None = None, resume: bool = True,
                 filename: str = "robustness", precision: str = "32"):
        self.attacks = [_setting(a) for a in (attacks or [])]
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
        self.precision = check_precision(precision)
        self.bounds = (0.0, 1.0)  # the datamodule's input range, read when the evaluation runs
        self.sanity_settings = self._sanity_settings()
        self.results: EvaluationResults | None = None
        self.results_path: Path | None = None
        self.computed_batches: list[int] = []

    def _sanity_settings(self) -> list[AttackSetting]:
        """PGD at eps 0 and at half the input range (0.5 for [0, 1] images, 1.0 for [-1, 1] audio)."""
        if not self.sanity_checks:
            return []
        large = LARGE_EPS * (self.bounds[1] - self.bounds[0])
        return [AttackSetting("pgd", eps=0.0, steps=1).expand()[0],
                AttackSetting("pgd", eps=large, steps=20).expand()[0]]

    # ---- hooks ---------------------------------------------------------------------------------
    def check_network(self, network) -> None:
        """Raise ``ValueError`` when ``network`` cannot honour a setting's surrogate or BPDA (the CLI calls this
        when it builds the run, before training)."""
        for setting in self.settings:
            check_threat_model(setting, network)

    def setup(self, trainer, pl_module, stage):
        self.check_network(pl_module.network)

    def on_test_epoch_end(self, trainer, pl_module):
        self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        if self.after_fit:
            self.evaluate(trainer, pl_module)

    # ---- data ----------------------------------------------------------------------------------
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
        return batch_loader(dataset, batches, getattr(datamodule, "num_workers", 0),
                            getattr(datamodule, "pin_memory", False))

    def _inputs(self, trainer, pl_module, batch):
        prepare = getattr(pl_module, "prepare_input", lambda x: x)
        batch = trainer.strategy.batch_to_device(batch, pl_module.device)
        x, y = trainer.datamodule.preprocess(batch, train=False)
        return prepare(x), y

    def on_batch_done(self, batch_idx: int) -> None:
        """Called after each attacked batch has been saved (a seam for progress reporting and tests)."""

    # ---- the evaluation, stage by stage --------------------------------------------------------
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> EvaluationResults:
        """Run the suite; return (and store in ``self.results``) the results on every rank."""
        dataset = self._dataset(trainer)
        self.bounds = tuple(float(b) for b in getattr(trainer.datamodule, "input_bounds", (0.0, 1.0)))
        self.sanity_settings = self._sanity_settings()
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: all ranks
        with torch.inference_mode(False), torch.enable_grad(), attack_mode(pl_module.network), \
                evaluation_precision(pl_module.device, self.precision):
            plan = self._plan(trainer, pl_module, dataset, out_dir)
            self._attack(trainer, pl_module, dataset, plan)
            tally = Tally.for_runs(len(dataset), plan.runs, plan.draws)
            for batch_idx in plan.own:
                tally.add(plan.batches[batch_idx], plan.cache.load(batch_idx))
        device = pl_module.device
        tally.reduce(lambda t: trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu())
        summary = summarize(plan.runs, tally, plan.randomized, self.sanity_checks, self.precision, plan.probe)
        self.results = self._identified(summary, trainer, pl_module, plan)
        self._report(trainer, out_dir, Path(self.results.checkpoint).stem if self.results.checkpoint else None)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            plan.cache.remove()
        return self.results

    def _plan(self, trainer, pl_module, dataset, out_dir: Path) -> _Plan:
        """The batches, whether the network is randomized, the runs, the cache and this rank's share."""
        network = pl_module.network
        n = len(dataset)
        batch_size = self.batch_size or getattr(trainer.datamodule, "eval_batch_size", None) or 128
        batches = list(BatchSampler(SequentialSampler(range(n)), batch_size, drop_last=False))
        surrogates = [(path, load_network(network, path).to(pl_module.device)) for path in self.surrogates]
        # every rank probes batch 0 itself, so all take the same decision without communicating
        probe_x, probe_y = self._inputs(trainer, pl_module, next(iter(self._loader(trainer, dataset, batches[:1]))))
        randomized = is_randomized(network, probe_x)
        draws = self.draws if randomized else 1
        theta_one = randomized and self.sanity_checks and declares_randomness(network)
        runs = plan_runs(self.settings, network, surrogates, theta_one, self.sanity_settings)
        runs = [run._replace(setting=with_version(run.setting, randomized)) for run in runs]
        probe = suite_probe(runs, network, probe_x, probe_y, self.seed) if self.sanity_checks else None
        digest = model_hash(network)
        cache = BatchCache(out_dir / f"{self.filename}_batches",
                           fingerprint(self.settings + self.sanity_settings, self.surrogates, self.seed,
                                       self.split, n, batch_size, draws, digest, self.precision))
        return _Plan(batches, runs, randomized, draws, digest, cache,
                     own_batches(len(batches), trainer.global_rank, trainer.world_size), probe)

    def _attack(self, trainer, pl_module, dataset, plan: _Plan) -> None:
        """Attack this rank's batches that the cache lacks, saving each; stop (and requeue) on a stop signal."""
        todo = [b for b in plan.own if not (self.resume and plan.cache.has(b))]
        if len(todo) < len(plan.own):
            rank_zero_info(f"robustness: reusing {len(plan.own) - len(todo)} of {len(plan.own)} batches saved by "
                           "an interrupted evaluation")
        loader = iter(self._loader(trainer, dataset, [plan.batches[b] for b in todo]))
        # one step per (batch, setting), named by the setting that runs: AutoAttack on a batch takes minutes
        bar = tqdm(total=len(todo) * len(plan.runs), desc="robustness", leave=False, unit="setting",
                   disable=not trainer.is_global_zero or trainer.progress_bar_callback is None)

        def on_run(where: str, i: int) -> None:
            bar.update(i > 0)
            bar.set_postfix_str(f"{where}: {plan.runs[i].setting.name}")

        requeue = next((cb for cb in trainer.callbacks if isinstance(cb, Requeue)), None)
        # every rank looks for a stop signal as often as rank 0 (the one with the most batches) does: under DDP
        # that look is a collective
        done = 0
        for i in range(len(own_batches(len(plan.batches), 0, trainer.world_size))):
            if i < len(plan.own) and plan.own[i] in todo:
                done += 1
                x, y = self._inputs(trainer, pl_module, next(loader))
                result = evaluate_batch(pl_module.network, plan.runs, x, y, plan.own[i], plan.draws, self.seed,
                                        self.bounds, functools.partial(on_run, f"batch {done}/{len(todo)}"))
                bar.update(1)
                plan.cache.save(plan.own[i], result)
                self.computed_batches.append(plan.own[i])
                self.on_batch_done(plan.own[i])
            if requeue is not None and stop_requested(trainer):
                bar.close()
                requeue.stop(trainer, f"robustness evaluation stopped: its finished batches are saved in "
                                      f"{plan.cache.folder}, and the same command attacks only the others")
        bar.close()

    def _identified(self, results: EvaluationResults, trainer, pl_module, plan: _Plan) -> EvaluationResults:
        """``results`` with what identifies the evaluation: split, seed, model, weights, checkpoint, time."""
        # after fit the weights are the final ones (a resumed fit's ckpt_path is where it started, not them)
        ckpt = getattr(trainer, "ckpt_path", None) if trainer.state.fn != "fit" else None
        # a test run starts at step 0: the checkpoint's own epoch and step say which weights these are
        loaded = (getattr(pl_module, "loaded_checkpoint", None) or {}) if ckpt else {}
        return replace(results, split=self.split, seed=self.seed, model=type(pl_module).__name__,
                       network=type(pl_module.network).__name__, model_hash=plan.digest,
                       checkpoint=str(ckpt) if ckpt else None, epoch=loaded.get("epoch", trainer.current_epoch),
                       world_size=trainer.world_size,
                       global_step=loaded.get("global_step", trainer.global_step), fingerprint=plan.cache.folder.name,
                       time=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def _report(self, trainer, out_dir: Path, checkpoint: str | None = None) -> None:
        results = self.results
        rank_zero_info(f"\nRobustness ({results.model}, {results.split} split, n={results.n}"
                       f"{', randomized: ' + str(results.draws) + ' draws' if results.randomized else ''}):"
                       f"\n{markdown_table(results)}")
        for v in results.failed_verdicts:
            rank_zero_warn(f"sanity check {v.check} failed: {v.detail}. Likely cause: {v.likely_cause}")
        if trainer.is_global_zero:
            stem = self.filename + (f"-{checkpoint}" if checkpoint else "")
            self.results_path = write_results(results, out_dir, free_stem(out_dir, stem, results.fingerprint))
            rank_zero_info(f"Robustness results written to {self.results_path}")
        self.results_path = results.path = Path(trainer.strategy.broadcast(str(self.results_path)))
        if trainer.logger is not None:
            trainer.logger.log_metrics(scalars(results), step=trainer.global_step)


class _Plan(NamedTuple):
    """What one evaluation attacks, and where its finished batches go."""

    batches: list[list[int]]
    runs: list[Run]
    randomized: bool
    draws: int
    digest: str
    cache: BatchCache
    own: list[int]
    probe: dict | None  # the official AutoAttack model checks' measurements


def _setting(entry: dict | AttackSetting) -> AttackSetting:
    if isinstance(entry, AttackSetting):
        return entry
    if not isinstance(entry, dict):
        raise ValueError(f"each evaluation attack is a mapping such as {{attack: pgd, eps: 8/255}}, got {entry!r}")
    setting = AttackSetting(**entry)
    if setting.required_context():
        raise ValueError(f"{setting.attack} runs in training only (it needs {', '.join(setting.required_context())} "
                         "from a defense); an evaluation suite takes the other attacks of the table")
    return setting
