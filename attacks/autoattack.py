"""AutoAttack (Croce & Hein, ICML 2020), composed from torchattacks' APGD, APGDT, FAB and Square.

The official package (fra31/auto-attack) is not on PyPI, so this module rebuilds its two evaluation
protocols from torchattacks 3.5.1's components, with every argument written out. Settings are those
of the official ``autoattack/autoattack.py`` (``AutoAttack.__init__`` and ``set_version``):

``standard`` (deterministic models), run in this order, each attack only on the points that are
still robust (correctly classified) after the ones before it:

* APGD-CE: ``APGD(loss="ce", steps=100, n_restarts=1, eot_iter=1, rho=0.75)``.
* APGD-T: ``APGDT(steps=100, n_restarts=1, eot_iter=1, rho=0.75)`` with 9 target classes, the 2nd
  to 10th most likely classes at the clean input (``min(9, n_classes - 1)``).
* FAB-T: ``FAB(multi_targeted=True, steps=100, n_restarts=1, alpha_max=0.1, eta=1.05, beta=0.9)``
  with 9 target classes.
* Square: ``Square(n_queries=5000, p_init=0.8, n_restarts=1, loss="margin", resc_schedule=False)``.

``rand`` (randomized models): APGD-CE then APGD-DLR (untargeted), ``steps=100, n_restarts=1,
rho=0.75``, each gradient the mean over ``eot_iter = eot_draws`` (20) forward/backward passes (EOT).

Every component gets ``seed``, as the official code does when its ``seed`` is set. Per example the
first successful adversarial example is kept; clean-misclassified points are never attacked and come
back unchanged; points no attack breaks come back as the clean input (official behaviour).

Why not ``torchattacks.AutoAttack``: in 3.5.1 it passes no ``steps`` to APGD, APGDT and FAB, so they
run torchattacks' default of 10 iterations instead of 100; APGDT and FAB get ``n_classes`` and target
``n_classes - 1`` classes (99 on a 100-class problem instead of 9); Square keeps
``resc_schedule=True`` where the official code sets False; its default ``seed=None`` seeds every
component from the clock; its ``MultiAttack`` checks robustness between stages with one forward pass,
also for ``version="rand"``; and ``Attack.__call__`` switches the model to eval mode (which turns
dropout-style randomness off, so the 'rand' version would attack a deterministic model) and
afterwards calls ``model.train()`` on the whole model, which loses per-submodule modes.

Deviations from the official protocol, and how the components are driven:

* The model's mode is the caller's. Components are driven through ``forward`` (standard) or
  ``attack_single_run`` (rand, below), never through ``Attack.__call__`` and its eval switch
  (``__call__`` adds nothing else here: no normalization is registered). Put a deterministic
  model in eval mode first (:func:`advtrain.attacks.mode.attack_mode`); keep a randomized model's
  randomness on for ``rand``. Every submodule's flag is restored anyway.
* Between stages of ``rand`` a point is not judged by one forward pass (the official code does
  use one, ``run_standard_evaluation``): it counts as robust while at least half of ``check_draws``
  forward passes classify it correctly ("majority rule"; a tie stays robust and is attacked further).
  The same rule decides which clean points are attacked at all. Inside a stage the same holds:
  ``APGD.perturb`` (official and torchattacks) drops points that one clean forward pass
  misclassifies and returns the clean input unless one draw was fooled during the run, so each
  rand stage calls ``attack_single_run`` (seeded as ``perturb`` seeds it) on every still-robust
  point and keeps the better of its two outputs (highest-loss iterate, last iterate some draw
  misclassified) by the number of correct draws. A point that no stage breaks keeps the candidate
  (clean input or a stage's output) with the fewest correct draws. The final number is not this
  module's: the report's counts come from the same draws that selected the examples (biased toward
  the attacker), so report a fresh several-draw evaluation of the returned ``x_adv`` (the fraction of
  draws classified correctly, as ``callbacks/robustness.py`` does), i.e. follow the official protocol
  of evaluating a randomized model over several runs rather than one.
* ``standard`` keeps the official single-forward check, and warns (as the official
  ``checks.check_randomized`` does) when two forward passes of the clean batch differ.
* torchattacks seeds the global RNGs (``torch.random.manual_seed(seed)`` in every ``perturb``);
  the whole run is wrapped in ``torch.random.fork_rng`` so the caller's random state is unchanged.
  The model's own randomness (dropout) draws from the seeded global RNG, so a run is reproducible
  given ``seed`` on a randomized model too.
* torchattacks' FAB calls ``loss.backward()``, which accumulates gradients in the parameters; every
  parameter's ``.grad`` is restored afterwards (the package's rule: attacks leave weight gradients
  untouched).
* torchattacks gets the inputs, and their gradients, in the default memory format: a channels_last network
  (``configs/trainer/gpu.yaml``) gives channels_last input gradients, which FAB's ``.view`` refuses. ``x_adv``
  comes back in the input's memory format.
* The run is in float32 with autocast off (APGD's step-size control and FAB's projections are not
  written for bf16); the result is returned in the input's dtype.
* Each call attacks the batch it is given in one piece (the official code splits into ``bs=250``);
  the caller batches. torchattacks' loops sync with the host (``.item()``, NumPy): this is an
  evaluation attack, not a training-loop one.
* Square's window is capped at the short side of a non-square image (the official code crashes there, and
  torchattacks places windows at negative offsets); square images are not affected.
* ``standard`` needs image batches (N, C, H, W): Square samples square windows. ``rand`` (APGD only)
  also takes other shapes, e.g. waveforms (N, 1, L), viewed as (N, 1, 1, D) for torchattacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .autoattack_components import (
    EOT_DRAWS,
    FAB_ALPHA_MAX,
    FAB_BETA,
    FAB_ETA,
    ITERATIONS,
    RHO,
    SQUARE_P_INIT,
    SQUARE_QUERIES,
    TARGET_CLASSES,
    VERSIONS,
    _apgd_every_point,
    _check_norm,
    _correct_fraction,
    _DefaultFormat,
    _kept_state,
    _Reshaped,
    _seed_rngs,
    _torchattacks_version,
    _warn_if_randomized,
    _zero_gradient_points,
    build_stages,
)
from .budget import check_steps, parse_budget
from .core import check_inputs
from .diagnostics import hand_in

AUTOATTACK_VERSION = ("advtrain AutoAttack composition of torchattacks 3.5.1 components, "
                      "settings of fra31/auto-attack standard/rand")
STAGES = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "rand": ("apgd-ce", "apgd-dlr")}
DLR_STAGES = ("apgd-t", "apgd-dlr")  # where the official code checks for zero gradients


def autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, norm: str = "Linf",
               version: str = "standard", n_classes: int = 10, seed: int = 0, eot_draws: int = EOT_DRAWS,
               check_draws: int | None = None, log: Callable[[str], None] | None = None) -> Tensor:
    """AutoAttack ``version`` ("standard" or "rand") at budget ``eps``; returns ``x_adv`` (detached).

    See :func:`autoattack_run` for the arguments and the module docstring for the protocol.
    """
    x_adv, _ = autoattack_run(model, x, y, eps, norm=norm, version=version, n_classes=n_classes, seed=seed,
                              eot_draws=eot_draws, check_draws=check_draws, log=log)
    return x_adv


def _check_arguments(x: Tensor, y: Tensor, version: str, seed: int, eot_draws: int, check_draws: int | None,
                     n_classes: int, log) -> int:
    """Refuse what AutoAttack cannot run; return ``check_draws`` resolved."""
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; choose one of {', '.join(VERSIONS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    check_steps(eot_draws, "eot_draws")
    check_draws = eot_draws if check_draws is None else check_steps(check_draws, "check_draws")
    smallest = 4 if version == "standard" else 3  # targeted DLR needs 4 logits, DLR 3
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < smallest:
        raise ValueError(f"AutoAttack {version} needs n_classes >= {smallest} (its DLR loss compares the "
                         f"{smallest - 1} largest other logits), got {n_classes!r}")
    if log is not None and not callable(log):
        raise ValueError(f"log must be a callable taking one string, got {log!r}")
    check_inputs(x, y)
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-D tensor of class indices, got shape {tuple(y.shape)} {y.dtype}")
    if version == "standard" and x.dim() != 4:
        raise ValueError(f"AutoAttack standard needs image batches (N, C, H, W) (Square samples square "
                         f"windows), got shape {tuple(x.shape)}; version='rand' takes other shapes")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch (N, ...), got shape {tuple(x.shape)}")
    return check_draws


def _as_images(model: nn.Module, x: Tensor) -> tuple[nn.Module, Tensor]:
    """The model and the inputs as torchattacks takes them: float32 or wider, (N, C, H, W) (a waveform
    (N, 1, L) is viewed as (N, 1, 1, D)), in the default memory format, gradients included."""
    inputs = x.detach().to(torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype).contiguous()
    if inputs.dim() == 4:
        return _DefaultFormat(model), inputs
    return _DefaultFormat(_Reshaped(model, x.shape[1:])), inputs.reshape(x.shape[0], 1, 1, -1)


class _Run:
    """One AutoAttack run's state between stages: which points are still robust, the best examples so far and, for
    ``rand``, each point's fraction of correct draws."""

    def __init__(self, target: nn.Module, inputs: Tensor, y: Tensor, version: str, draws: int, n_classes: int):
        self.target, self.inputs, self.y, self.draws = target, inputs, y, draws
        self.randomized = version == "rand"
        with torch.no_grad():
            logits = target(inputs)
        if logits.dim() != 2 or logits.shape[1] != n_classes:
            raise ValueError(f"the model returns logits of shape {tuple(logits.shape)}, but n_classes is "
                             f"{n_classes}")
        if self.randomized:
            self.best_fraction = _correct_fraction(target, inputs, y, draws)
            self.robust = 2 * self.best_fraction >= 1
        else:
            self.robust = logits.argmax(1) == y
            _warn_if_randomized(target, inputs, logits)
        self.x_adv = inputs.clone()

    def stage(self, name: str, attack, settings: dict) -> dict:
        """Run one stage on the still-robust points; keep what it broke; return its report entry."""
        start = time.perf_counter()
        idx = self.robust.nonzero().flatten()
        entry = {"name": name, "component": f"torchattacks.{type(attack).__name__}", "settings": settings,
                 "driver": "attack_single_run, every still-robust point" if self.randomized else "forward",
                 "attacked": int(idx.numel())}
        if name in DLR_STAGES:
            entry["zero_gradient"] = 0 if idx.numel() == 0 else _zero_gradient_points(
                name, attack, self.target, self.inputs[idx], self.y[idx], settings["eot_iter"])
        if idx.numel() > 0:
            attack.set_device(self.inputs.device)
            if self.randomized:
                out, fraction = _apgd_every_point(attack, self.inputs[idx], self.y[idx], self.target, self.draws)
                with torch.no_grad():
                    still = 2 * fraction >= 1
                    better = fraction < self.best_fraction[idx]  # broken points always qualify
                    self.x_adv[idx[better]] = out[better]
                    self.best_fraction[idx[better]] = fraction[better]
            else:
                out = attack.forward(self.inputs[idx], self.y[idx]).detach().to(self.inputs.dtype)
                with torch.no_grad():
                    still = self.target(out).argmax(1) == self.y[idx]
                    self.x_adv[idx[~still]] = out[~still]
            self.robust[idx[~still]] = False
        entry["robust_after"] = int(self.robust.sum())
        if self.randomized:
            entry["correct_fraction_after"] = float(self.best_fraction.mean())
        entry["seconds"] = round(time.perf_counter() - start, 3)
        return entry


def autoattack_run(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, norm: str = "Linf",
                   version: str = "standard", n_classes: int = 10, seed: int = 0, eot_draws: int = EOT_DRAWS,
                   check_draws: int | None = None,
                   log: Callable[[str], None] | None = None) -> tuple[Tensor, dict]:
    """Run AutoAttack on one batch; return ``(x_adv, report)``.

    Args:
        model: returns logits for inputs in [0, 1]; its mode is left as the caller set it.
        x, y: inputs in [0, 1] (N, C, H, W) and integer labels (N,).
        eps: budget in the input's range (``8/255``, ``"8/255"``, ``0.5`` for L2).
        norm: ``"Linf"`` or ``"L2"`` (``"linf"``, ``"l2"`` too).
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square) or ``"rand"`` (APGD-CE, APGD-DLR
            with EOT) for models whose forward pass is random.
        n_classes: number of logits; targeted attacks use ``min(9, n_classes - 1)`` targets.
        seed: passed to every component; all randomness of the run follows from it.
        eot_draws: rand only: forward/backward passes averaged per gradient (official 20).
        check_draws: rand only: forward passes that decide whether a point is still robust
            (majority rule); defaults to ``eot_draws``.
        log: called with one line of progress per stage.

    The report is plain data for results files: ``source`` (:data:`AUTOATTACK_VERSION`),
    ``torchattacks`` version, ``version``, ``norm``, ``eps``, ``n_classes``, ``seed``, ``eot_draws``,
    ``check_draws``, ``robust_rule``, ``n_examples``, ``clean_correct``, ``robust`` (count after the
    last stage), ``seconds`` and ``attacks``: per stage ``name``, ``component``, ``settings`` (every
    argument given to the torchattacks constructor, plus ``n_target_classes`` read back from the
    built object), ``driver`` (the torchattacks method called), ``attacked`` (points it ran on),
    ``robust_after``, ``seconds`` and, for the DLR stages (APGD-T, APGD-DLR), ``zero_gradient``: the
    attacked points whose input gradient of the stage's loss is exactly zero. In rand mode also
    ``correct_fraction_clean`` and per stage ``correct_fraction_after``: the mean over examples of
    the fraction of ``check_draws`` passes classified correctly.
    """
    eps = parse_budget(eps, "eps")
    ta_norm = _check_norm(norm)
    check_draws = _check_arguments(x, y, version, seed, eot_draws, check_draws, n_classes, log)
    target, inputs = _as_images(model, x)
    y = y.detach().long()
    randomized = version == "rand"
    draws = check_draws if randomized else 1
    start = time.perf_counter()
    with _kept_state(model, inputs.device), torch.enable_grad(), \
            torch.autocast(inputs.device.type, enabled=False):
        _seed_rngs(seed, inputs.device)  # the model's own randomness (dropout) follows the seed too
        run = _Run(target, inputs, y, version, draws, n_classes)
        report = {
            "source": AUTOATTACK_VERSION, "torchattacks": _torchattacks_version(), "version": version,
            "norm": ta_norm.lower(), "eps": eps, "n_classes": n_classes, "seed": seed,
            "eot_draws": eot_draws if randomized else 1, "check_draws": draws,
            "robust_rule": (f"correct in at least half of {draws} forward passes" if randomized
                            else "correct in one forward pass (official)"),
            "n_examples": len(x), "clean_correct": int(run.robust.sum()), "attacks": [],
        }
        if randomized:
            report["correct_fraction_clean"] = float(run.best_fraction.mean())
        for name, attack, settings in build_stages(target, eps, norm=ta_norm, version=version,
                                                   n_classes=n_classes, seed=seed, eot_draws=eot_draws):
            entry = run.stage(name, attack, settings)
            report["attacks"].append(entry)
            if log is not None:
                log(f"AutoAttack {version} {name}: {entry['robust_after']}/{len(x)} robust "
                    f"(attacked {entry['attacked']}, {entry['seconds']:.1f} s)")
    report["robust"] = int(run.robust.sum())
    report["seconds"] = round(time.perf_counter() - start, 3)
    hand_in(report)  # to an evaluation collecting reports (advtrain.attacks.diagnostics)
    # in the input's dtype and memory format (empty_like keeps a channels_last input's)
    return torch.empty_like(x).copy_(run.x_adv.reshape(x.shape)), report


__all__ = ["AUTOATTACK_VERSION", "EOT_DRAWS", "FAB_ALPHA_MAX", "FAB_BETA", "FAB_ETA", "ITERATIONS", "RHO",
           "SQUARE_P_INIT", "SQUARE_QUERIES", "STAGES", "TARGET_CLASSES", "VERSIONS", "autoattack", "autoattack_run",
           "build_stages"]
