"""Latent t-SNE of clean test points and their adversarial examples (the ADR supplementary's Figs. 3-4).

The computation is in ``evaluation/latent_tsne.py``; this module is the Lightning callback that runs it."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import default_collate

from advtrain.attacks import ATTACKS, AttackSetting, attack_mode, seeded_generator
from advtrain.evaluation import craft, is_randomized
from advtrain.evaluation.landscape import _seeded, attack_setting
from advtrain.evaluation.latent_tsne import (
    ADVERSARIAL,
    CLEAN,
    embed,
    latents,
    plot_embedding,
    prediction_entropy,
    select_points,
)
from advtrain.evaluation.precision import evaluation_precision

__all__ = ["LatentTSNE"]


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class LatentTSNE(pl.Callback):
    """t-SNE of the latent z of a fixed set of clean evaluation points and of their adversarial examples.

    When it runs: at the end of each training epoch listed in ``epochs`` (Lightning's 0-based
    ``trainer.current_epoch``, as in checkpoint names), and at the end of ``test`` (``on_test_end``) when
    ``at_test`` is set. Every rank asks for the run directory (``trainer.log_dir``, a collective under DDP);
    rank zero alone computes and writes, and the ranks meet at a barrier afterwards.

    What it computes: the ``num_points`` examples of the datamodule's ``split`` chosen by a permutation seeded
    with ``seed`` (preprocessed as for evaluation, like ``LossLandscape``), their adversarial examples under
    ``attack`` (an :class:`advtrain.attacks.AttackSetting`; default PGD at the module's ``eps``; crafted in eval mode by
    :func:`advtrain.evaluation.craft`, random starts seeded by (``seed``, batch)), z of both from
    ``network.forward_with_latent`` and their predictions, and a two-dimensional t-SNE (scikit-learn, seeded)
    of the 2 ``num_points`` latents together. An attack *succeeded* when the network misclassifies the
    adversarial example (the supplementary's "positive adversarial example which successfully fools a defense").
    A randomized network (two forward passes differ, e.g. Tucker layers with theta < 1) is attacked with EOT
    (an attack setting with ``eot: 1`` gets ``eot`` gradient samples, as ``val_eot`` does in validation), and
    its z and prediction are the mean over ``draws`` seeded forward passes. The global RNG is left untouched.

    Writes, per run, under ``<run dir>/<dirname>/``: ``<name>.png`` (two panels: colour by class and by the
    entropy of the prediction; circles clean, triangles successful, squares failed adversarial examples) and
    ``<name>.json`` (indices, coordinates, labels, predictions, entropies, success flags, the attack), where
    ``<name>`` is ``epoch<E>`` or ``test`` / ``test-<checkpoint>``; an existing file is never replaced (``-2``,
    ``-3``, ... are appended). With a TensorBoardLogger: the figure (``latent_tsne/<name>``) and the embedding
    projector (z of all points, metadata class / clean-adversarial / attack outcome / prediction / entropy,
    thumbnails for images of at most 32 x 32 pixels in [0, 1]). The last results are kept in ``self.results``.

    Args:
        num_points: clean points (the plot shows twice as many: each with its adversarial example).
        split: ``test`` or ``val``.
        attack: an attack setting as configs write it, e.g. ``{attack: pgd, steps: 20}``; without ``eps`` it
            attacks at the module's ``eps``. Default PGD (10 steps) at the module's ``eps``.
        epochs: training epochs (0-based) after which to draw.
        at_test: also draw at the end of ``test``.
        seed: seeds the choice of points, the attack's random start, the network's random draws and t-SNE.
        perplexity: t-SNE perplexity (capped at (n - 1) / 3 for small sets).
        draws: forward passes averaged for a randomized network.
        eot: EOT gradient samples for a randomized network when ``attack`` leaves ``eot`` at 1.
        batch_size: examples per attack / forward batch.
        projector: also write TensorBoard's embedding projector.
        dirname: folder under the run directory.
    """

    def __init__(self, num_points: int = 500, split: str = "test", attack: dict | None = None,
                 epochs: list[int] | None = None, at_test: bool = True, seed: int = 0, perplexity: float = 30.0,
                 draws: int = 10, eot: int = 10, batch_size: int = 256, projector: bool = True,
                 dirname: str = "latent_tsne"):
        _positive_int("num_points", num_points, 2)
        for name, value in (("draws", draws), ("eot", eot), ("batch_size", batch_size)):
            _positive_int(name, value)
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        epochs = [] if epochs is None else list(epochs)
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in epochs):
            raise ValueError(f"epochs must list non-negative (0-based) epoch numbers, got {epochs}")
        if isinstance(perplexity, bool) or not isinstance(perplexity, int | float) or not math.isfinite(perplexity) \
                or perplexity <= 0:
            raise ValueError(f"perplexity must be a positive number, got {perplexity!r}")
        if not dirname or Path(dirname).is_absolute() or ".." in Path(dirname).parts:
            raise ValueError(f"dirname must be a relative folder name inside the run directory, got {dirname!r}")
        self.attack = dict(attack or {"attack": "pgd"})
        attack_setting(self.attack, 8 / 255, "LatentTSNE")  # a typo or an impossible setting fails when read
        self.num_points, self.split, self.epochs, self.at_test = num_points, split, sorted(set(epochs)), at_test
        self.seed, self.perplexity, self.draws, self.eot = seed, float(perplexity), draws, eot
        self.batch_size, self.projector, self.dirname = batch_size, projector, dirname
        self.results: dict | None = None

    # ---- hooks ---------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch in self.epochs:
            self.run(trainer, pl_module, name=f"epoch{trainer.current_epoch}")

    def on_test_end(self, trainer, pl_module):
        if self.at_test:
            ckpt = getattr(trainer, "ckpt_path", None)
            self.run(trainer, pl_module, name="test" + (f"-{Path(ckpt).stem}" if ckpt else ""))

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str = "manual") -> dict | None:
        """Compute and write one embedding; returns the results on rank zero (None elsewhere)."""
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / self.dirname  # collective under DDP
        results = None
        if trainer.is_global_zero:
            results, z, images = self.compute(trainer, pl_module)
            self._write(trainer, out_dir, name, results, z, images)
        trainer.strategy.barrier()
        self.results = results
        return results

    # ---- the computation -------------------------------------------------------------------------
    def setting(self, pl_module: pl.LightningModule, randomized: bool) -> AttackSetting:
        """The attack: ``attack`` at the module's ``eps`` unless it gives one, with EOT on a randomized network."""
        setting = attack_setting(self.attack, getattr(pl_module, "eps", None), "LatentTSNE")
        if randomized and setting.eot == 1:
            if not setting.spec.eot:
                raise ValueError(f"LatentTSNE: the network is randomized, so the attack needs EOT, which "
                                 f"{setting.attack} has not; choose one of "
                                 f"{', '.join(n for n, s in ATTACKS.items() if s.eot)}")
            setting = replace(setting, eot=self.eot)
        return setting

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        """``(results, z, images)``: the JSON-able results, z of all points (clean first) and the projector's
        thumbnails (None when the inputs are not small [0, 1] images)."""
        network = getattr(pl_module, "network", pl_module)
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "eval_dataset"):
            raise RuntimeError("LatentTSNE needs an advtrain datamodule (one with eval_dataset and preprocess); "
                               "pass it as `data` in the config")
        dataset = datamodule.eval_dataset(self.split)
        indices = select_points(len(dataset), self.num_points, self.seed)
        bounds = tuple(float(b) for b in getattr(datamodule, "input_bounds", (0.0, 1.0)))
        device = pl_module.device
        size = self.batch_size
        # seeded and forked: the randomness probe and the EOT draws are reproducible, the global RNG untouched
        with torch.inference_mode(False), _seeded(device, self.seed), evaluation_precision(pl_module.device):
            batch = trainer.strategy.batch_to_device(default_collate([dataset[i] for i in indices]), device)
            preprocess = getattr(datamodule, "preprocess", None)
            x, y = preprocess(batch, train=False) if preprocess is not None else batch
            x, y = x.detach().clone(), torch.as_tensor(y).detach().clone()
            with attack_mode(network):
                randomized = is_randomized(network, x[:size])
            setting = self.setting(pl_module, randomized)
            draws = self.draws if randomized else 1
            with torch.enable_grad():
                x_adv = torch.cat([craft(setting, network, x[i:i + size], y[i:i + size],
                                         seeded_generator(device, self.seed, i // size),
                                         bounds) for i in range(0, len(x), size)]).detach()
            # the same seeded draws for clean and adversarial inputs: their difference is the attack's, not chance's
            z_clean, p_clean = latents(network, x, draws, seed=self.seed, batch_size=size)
            z_adv, p_adv = latents(network, x_adv, draws, seed=self.seed, batch_size=size)
        z = torch.cat([z_clean, z_adv]).cpu()
        probabilities = torch.cat([p_clean, p_adv]).cpu()
        prediction = probabilities.argmax(1)
        labels = torch.cat([y, y]).cpu()
        coords, perplexity = embed(z.double().numpy(), seed=self.seed, perplexity=self.perplexity)
        n = len(indices)
        results = {
            "split": self.split, "indices": indices, "attack": setting.name, "attack_setting": setting.as_dict(),
            "randomized": randomized, "draws": draws, "seed": self.seed, "perplexity": perplexity,
            "latent_dim": int(z.shape[1]), "network": type(network).__name__, "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "layout": "row k < n: clean point indices[k]; row n + k: its adversarial example",
            "coords": coords.tolist(), "labels": labels.tolist(), "kind": [CLEAN] * n + [ADVERSARIAL] * n,
            "prediction": prediction.tolist(), "entropy": prediction_entropy(probabilities).tolist(),
            "clean_correct": (prediction[:n] == labels[:n]).tolist(),
            "attack_succeeded": (prediction[n:] != labels[n:]).tolist(),
        }
        images = None
        if x.dim() == 4 and x.shape[1] in (1, 3) and max(x.shape[2:]) <= 32 and bounds == (0.0, 1.0):
            images = torch.cat([x, x_adv]).float().clamp(0, 1).cpu()
        return results, z, images

    def _write(self, trainer, out_dir: Path, name: str, results: dict, z, images) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem, k = name, 1
        while (out_dir / f"{stem}.png").exists() or (out_dir / f"{stem}.json").exists():
            k += 1
            stem = f"{name}-{k}"  # never replace an earlier figure (another checkpoint, another test run)
        results["name"] = stem
        n = len(results["indices"])
        succeeded = sum(results["attack_succeeded"])
        title = (f"latent t-SNE, {stem}: {n} {self.split} points and their {results['attack']} examples "
                 f"({succeeded} of {n} attacks succeeded)")
        success = [False] * n + results["attack_succeeded"]
        fig = plot_embedding(results["coords"], results["labels"], results["entropy"], results["kind"], success,
                             title)
        fig.savefig(out_dir / f"{stem}.png")
        (out_dir / f"{stem}.json").write_text(json.dumps(results))
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            writer.add_figure(f"latent_tsne/{stem}", fig, global_step=trainer.global_step, close=False)
            if self.projector:
                outcome = ["-"] * n + ["succeeded" if s else "failed" for s in results["attack_succeeded"]]
                metadata = [[str(c), kind, o, str(p), f"{h:.4f}"] for c, kind, o, p, h in
                            zip(results["labels"], results["kind"], outcome, results["prediction"],
                                results["entropy"])]
                writer.add_embedding(z, metadata=metadata, label_img=images, global_step=trainer.global_step,
                                     tag=f"latent_tsne/{stem}",
                                     metadata_header=["class", "kind", "attack", "prediction", "entropy"])
            writer.flush()
        rank_zero_info(f"Latent t-SNE of {n} points and their adversarial examples written to {out_dir / stem}.png")
