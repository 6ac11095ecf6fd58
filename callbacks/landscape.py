"""Loss landscape: the loss on a 2-D grid around test points, as contour plots (docs/methods.md, defensive
tensorization: axes = the input-gradient direction and a random direction orthogonal to it, [-0.5, 0.5]), and,
optionally, the loss with respect to the latent z around an adversarial example (ADR supplementary, Figs. 1-2).

The computation is in ``evaluation/landscape.py``; this module is the Lightning callback that runs it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import default_collate

from advtrain.attacks import attack_mode, stream_seed
from advtrain.evaluation import craft, is_randomized
from advtrain.evaluation.landscape import (
    AXIS_LABELS,
    NORMS,
    LatentHead,
    attack_setting,
    landscape_directions,
    loss_surface,
    plot_surface,
)
from advtrain.evaluation.precision import evaluation_precision
from advtrain.networks.randomness import declares_randomness, randomness_at, randomness_off

__all__ = ["LossLandscape", "landscape_directions", "loss_surface", "plot_surface"]


SPACES = ("input", "latent", "both")


def _theta_name(theta: float) -> str:
    return f"{theta:g}"


class LossLandscape(pl.Callback):
    """Contour plots of the loss on a 2-D plane through chosen evaluation points, for several thetas.

    When it runs: at the end of ``fit`` (``on_fit_end``, on the final weights, after an EMA callback has
    copied its average in) when ``after_fit`` is set, and at the end of ``test`` (``on_test_end``). Every rank
    asks for the run directory (``trainer.log_dir``, a collective under DDP); rank zero alone computes and
    writes, and the ranks meet at a barrier afterwards.

    What it computes, per point ``i`` of the datamodule's ``split`` (``eval_dataset``, preprocessed as for
    evaluation):

    * the axes (:func:`landscape_directions`): ``d1`` the input gradient of the cross-entropy at the clean
      point with the randomness off (theta = 1) and eval-mode BatchNorm, ``d2`` a Gaussian direction seeded by
      (``seed``, i), orthogonal to ``d1``; both scaled to unit L-inf (or L2) norm. The same axes serve every
      theta, so the surfaces of one point are comparable.
    * for each theta (every randomized module's level set by ``randomness_at``, e.g. Tucker layers' keep probability,
      restored after),
      the loss at ``x + a d1 + b d2`` for ``a, b`` in ``linspace(-span, span, grid)`` (:func:`loss_surface`):
      not clamped to the input range (that would bend the plane; see :func:`loss_surface`), batched, without
      gradients, on the module's device, in eval mode. A randomized network (theta < 1, or any test-time
      randomness) is averaged over ``draws`` forward passes, draw k being one seeded random network for the
      whole grid; a deterministic one is evaluated once.

    Latent space (``space: latent`` or ``both``; the ADR supplementary's Figs. 1-2): around the latent
    ``z_a`` of the point's adversarial example ``x_a`` (``attack``, default PGD at the module's ``eps``), the
    loss of ``network.logits_from_latent(z_a + a e1 + b e2)``, ``e1`` the gradient of the loss with respect to
    z at ``z_a`` and ``e2`` a seeded random direction orthogonal to it, normalized like the input axes, over
    ``[-latent_span, latent_span]`` (the supplementary gives no range: ``latent_span`` defaults to ``span``, in
    z's own units). ``around: adversarial`` centres the input surface on ``x_a`` too (the supplementary's
    top row); ``clean`` (default) keeps it on the clean point. ``x_a`` is crafted once per point on the network
    with its randomness off (theta = 1, like the axes), so every theta's surfaces share one centre; whether the
    attack fooled the network (the supplementary's positive / negative adversarial examples) is recorded.

    Writes ``<run dir>/<dirname>/point<i>_theta<t>.png`` per point and theta (``point<i>_latent_theta<t>.png``
    for the latent surface), ``<run dir>/<dirname>/landscape.json`` (the axis values and, per point and theta,
    the loss matrix ``loss[a][b]``, rows along the gradient direction; the latent ones under each point's
    ``latent``), and, with a TensorBoardLogger, figures tagged ``landscape/point<i>/theta<t>`` (``landscape/
    point<i>/latent/theta<t>``); a later run into the same folder writes ``<dirname>-2`` and so on, never over
    an earlier one. The last results are also kept in ``self.results``.

    Args:
        points: indices into the evaluation split.
        split: ``test`` or ``val``.
        span: the grid covers ``[-span, span]`` on both axes, in the input's natural units ([0, 1] pixels).
        grid: grid points per axis (odd values put a grid point on the clean input).
        thetas: keep probabilities to plot; a network without Tucker layers has only theta = 1 (a warning
            then replaces the list by ``[1.0]``).
        draws: forward passes averaged per grid point for a randomized network.
        normalize: ``linf`` (unit L-inf directions: the papers' units) or ``l2``.
        seed: seeds the random direction and the random draws of the network (the global RNG is untouched).
        after_fit: also run when fit ends.
        dirname: folder under the run directory.
        batch_size: grid points per forward pass.
        space: ``input`` (default), ``latent`` or ``both``.
        around: centre of the input surface: ``clean`` or ``adversarial``.
        attack: the attack that makes ``x_a``, as configs write it (``{attack: pgd, steps: 20}``; without
            ``eps``: the module's ``eps``). Default PGD-10 at the module's ``eps``.
        latent_span: the latent grid covers ``[-latent_span, latent_span]`` (default: ``span``).
    """

    def __init__(self, points: list[int] | None = None, split: str = "test", span: float = 0.5, grid: int = 21,
                 thetas: list[float] | None = None, draws: int = 8, normalize: str = "linf", seed: int = 0,
                 after_fit: bool = True, dirname: str = "landscape", batch_size: int = 256, space: str = "input",
                 around: str = "clean", attack: dict | None = None, latent_span: float | None = None):
        points = [0, 1, 2, 3] if points is None else list(points)
        thetas = [1.0] if thetas is None else list(thetas)
        if not points or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in points):
            raise ValueError(f"points must be a non-empty list of non-negative example indices, got {points}")
        if len(set(points)) != len(points):
            raise ValueError(f"points must not repeat an index, got {points}")
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        latent_span = span if latent_span is None else latent_span
        for name, value in (("span", span), ("latent_span", latent_span)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number (the grid covers [-{name}, {name}]), got {value!r}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if around not in ("clean", "adversarial"):
            raise ValueError(f"around must be 'clean' or 'adversarial' (the input surface's centre), got {around!r}")
        attack = dict(attack or {"attack": "pgd"})
        attack_setting(attack, 8 / 255, "LossLandscape")  # a typo or an impossible setting fails when read
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
            raise ValueError(f"grid must be an integer >= 2 (points per axis), got {grid!r}")
        if not thetas:
            raise ValueError("thetas must list at least one keep probability")
        for theta in thetas:
            if isinstance(theta, bool) or not isinstance(theta, int | float) or not 0.0 < theta <= 1.0:
                raise ValueError(f"every theta is a keep probability in (0, 1] (1 = no randomness), got {theta!r}")
        if len({_theta_name(t) for t in thetas}) != len(thetas):
            raise ValueError(f"thetas must not repeat a value, got {thetas}")
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
        if normalize not in NORMS:
            raise ValueError(f"normalize must be one of {NORMS}, got {normalize!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not dirname or Path(dirname).is_absolute() or ".." in Path(dirname).parts:
            raise ValueError(f"dirname must be a relative folder name inside the run directory, got {dirname!r}")
        self.points, self.split, self.span, self.grid = points, split, float(span), grid
        self.thetas = [float(t) for t in thetas]
        self.draws, self.normalize, self.seed = draws, normalize, seed
        self.after_fit, self.dirname, self.batch_size = after_fit, dirname, batch_size
        self.space, self.around, self.attack, self.latent_span = space, around, attack, float(latent_span)
        self.results: dict | None = None

    # ---- hooks ---------------------------------------------------------------------------------
    def on_fit_end(self, trainer, pl_module):
        if self.after_fit:
            self.run(trainer, pl_module, stage="fit")

    def on_test_end(self, trainer, pl_module):
        self.run(trainer, pl_module, stage="test")

    # ---- the computation -------------------------------------------------------------------------
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str = "manual") -> dict | None:
        """Compute and write the landscapes; returns the results on rank zero (None elsewhere)."""
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / self.dirname  # collective under DDP
        results = None
        if trainer.is_global_zero:
            results = self.compute(trainer, pl_module)
            results["stage"] = stage
            self._write(trainer, out_dir, results)
        trainer.strategy.barrier()
        self.results = results
        return results

    def _inputs(self, trainer, pl_module) -> tuple[Tensor, Tensor]:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "eval_dataset"):
            raise RuntimeError("LossLandscape needs an advtrain datamodule (one with eval_dataset and preprocess); "
                               "pass it as `data` in the config")
        dataset = datamodule.eval_dataset(self.split)
        missing = [p for p in self.points if p >= len(dataset)]
        if missing:
            raise ValueError(f"LossLandscape points {missing} are out of range: the {self.split} split has "
                             f"{len(dataset)} examples")
        batch = default_collate([dataset[p] for p in self.points])
        batch = trainer.strategy.batch_to_device(batch, pl_module.device)
        preprocess = getattr(datamodule, "preprocess", None)
        x, y = preprocess(batch, train=False) if preprocess is not None else batch
        return x.detach().clone(), torch.as_tensor(y).detach().clone()

    def _surfaces(self, model, centre: Tensor, y: Tensor, d1: Tensor, d2: Tensor, axis: Tensor, thetas: list[float],
                  random: bool, point_seed: int) -> dict:
        """The surface of ``model`` around ``centre`` for each theta (averaged over ``draws`` when randomized)."""
        surfaces = {}
        for theta in thetas:
            with randomness_at(model, theta), attack_mode(model):
                randomized = (theta < 1.0 and random) or is_randomized(model, centre.unsqueeze(0))
                draws = self.draws if randomized else 1
                loss = loss_surface(model, centre, y, d1, d2, axis, axis, draws=draws, batch_size=self.batch_size,
                                    seed=stream_seed(point_seed, round(theta * 1_000_000)))
            surfaces[_theta_name(theta)] = {"theta": theta, "draws": draws, "loss": loss.cpu().tolist()}
        return surfaces

    def _adversarial(self, trainer, pl_module, network, x: Tensor, y: Tensor, latent: bool):
        """``(setting, x_a, z_a, prediction on x_a)``: crafted and read with the randomness off (theta = 1) in eval
        mode, the random start seeded by ``seed``; ``z_a`` is None unless ``latent``."""
        setting = attack_setting(self.attack, getattr(pl_module, "eps", None), "LossLandscape")
        bounds = tuple(float(b) for b in getattr(trainer.datamodule, "input_bounds", (0.0, 1.0)))
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        with randomness_off(network), torch.enable_grad():
            x_adv = craft(setting, network, x, y, generator, bounds).detach()
        with torch.no_grad(), attack_mode(network), randomness_off(network):
            z_adv, logits = network.forward_with_latent(x_adv) if latent else (None, network(x_adv))
        return setting, x_adv, z_adv, logits.argmax(1)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        network = getattr(pl_module, "network", pl_module)
        thetas = self.thetas
        random = declares_randomness(network)
        if not random and thetas != [1.0]:
            rank_zero_warn(f"LossLandscape: {type(network).__name__} has no Tucker layers, so theta has no effect; "
                           f"plotting theta = 1 only instead of {thetas}")
            thetas = [1.0]
        latent = self.space != "input"
        adversarial = latent or self.around == "adversarial"
        head = LatentHead(network) if latent else None  # fails here for a network without a latent interface
        axis = torch.linspace(-self.span, self.span, self.grid, dtype=torch.float64)
        latent_axis = torch.linspace(-self.latent_span, self.latent_span, self.grid, dtype=torch.float64)
        entries, setting = [], None
        with torch.inference_mode(False), evaluation_precision(pl_module.device):
            x, y = self._inputs(trainer, pl_module)
            if adversarial:
                setting, x_adv, z_adv, adv_prediction = self._adversarial(trainer, pl_module, network, x, y, latent)
            for i, index in enumerate(self.points):
                xi, yi = x[i], y[i]
                point_seed = stream_seed(self.seed, index)
                with torch.no_grad(), attack_mode(network), randomness_off(network):
                    prediction = int(network(xi.unsqueeze(0)).argmax(1).item())
                entry = {"index": index, "label": int(yi), "prediction": prediction}
                if adversarial:
                    entry["adversarial_prediction"] = int(adv_prediction[i])
                    entry["attack_succeeded"] = entry["adversarial_prediction"] != entry["label"]
                if self.space != "latent":
                    centre = x_adv[i] if self.around == "adversarial" else xi
                    d1, d2 = landscape_directions(network, centre, yi, seed=point_seed, normalize=self.normalize)
                    entry["thetas"] = self._surfaces(network, centre, yi, d1, d2, axis, thetas, random, point_seed)
                if latent:
                    zi, latent_seed = z_adv[i], stream_seed(point_seed, 1)  # its own random direction, not the input's
                    e1, e2 = landscape_directions(head, zi, yi, seed=latent_seed, normalize=self.normalize)
                    entry["latent"] = {"latent_dim": zi.numel(), "thetas": self._surfaces(
                        head, zi, yi, e1, e2, latent_axis, thetas, random, latent_seed)}
                entries.append(entry)
        results = {"split": self.split, "span": self.span, "grid": self.grid, "normalize": self.normalize,
                   "seed": self.seed, "axes": {"alpha": AXIS_LABELS[0], "beta": AXIS_LABELS[1]},
                   "alphas": axis.tolist(), "betas": axis.tolist(), "thetas": thetas,
                   "loss_layout": "loss[a][b]: row a along the gradient direction (alphas), column b along the "
                                  "random orthogonal direction (betas); inputs not clamped to the valid range",
                   "network": type(network).__name__, "global_step": trainer.global_step, "points": entries,
                   "space": self.space, "around": self.around}
        if adversarial:
            results["attack"] = setting.name
        if latent:
            results.update(latent_span=self.latent_span, latent_alphas=latent_axis.tolist(),
                           latent_betas=latent_axis.tolist())
        return results

    def _titles(self, results: dict, entry: dict) -> dict:
        """Figure name stem -> (title's first line, second line or None, tag, surfaces, axis values)."""
        i, head = entry["index"], f"point {entry['index']} (label {entry['label']}, predicted {entry['prediction']})"
        if "attack_succeeded" in entry:
            outcome = "succeeded" if entry["attack_succeeded"] else "failed"
            detail = (f"point {i}: label {entry['label']}, predicted {entry['prediction']} clean, "
                      f"{entry['adversarial_prediction']} adversarial (attack {outcome})")
        figures = {}
        if "thetas" in entry:
            lines = ((f"input around the {results['attack']} example", detail) if self.around == "adversarial"
                     else (head, None))
            figures[f"point{i}"] = (*lines, f"landscape/point{i}", entry["thetas"], results["alphas"])
        if "latent" in entry:
            figures[f"point{i}_latent"] = (f"latent z around the {results['attack']} example", detail,
                                           f"landscape/point{i}/latent", entry["latent"]["thetas"],
                                           results["latent_alphas"])
        return figures

    def _write(self, trainer, out_dir: Path, results: dict) -> None:
        base, k = out_dir, 1
        while (out_dir / "landscape.json").exists():  # never replace an earlier run's figures (fit end, then test)
            k += 1
            out_dir = base.with_name(f"{base.name}-{k}")
        out_dir.mkdir(parents=True, exist_ok=True)
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        for entry in results["points"]:
            for stem, (first, second, tag, surfaces, axis) in self._titles(results, entry).items():
                for name, surface in surfaces.items():
                    title = f"{first}, theta = {name}" + (f", {surface['draws']} draws" if surface["draws"] > 1 else "")
                    fig = plot_surface(axis, axis, surface["loss"], title + (f"\n{second}" if second else ""))
                    fig.savefig(out_dir / f"{stem}_theta{name}.png")
                    for writer in writers:
                        writer.add_figure(f"{tag}/theta{name}", fig, global_step=trainer.global_step, close=False)
        for writer in writers:
            writer.flush()
        (out_dir / "landscape.json").write_text(json.dumps(results))
        rank_zero_info(f"Loss landscapes of {len(results['points'])} points written to {out_dir}")
