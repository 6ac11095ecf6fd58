"""GAMA: the Guided Adversarial Margin Attack (Sriramanan et al., NeurIPS 2020), PGD and Frank-Wolfe forms.

GAMA maximizes, per example, the margin on softmax probabilities plus a relaxation term that pulls
the prediction away from a reference prediction p(x0)::

    L(x~) = max_{j != y} p_j(x~) - p_y(x~) + w_t * sum_c (p_c(x0) - p_c(x~))^2

with a weight w_t that decays linearly to 0, so the attack ends on the plain probability margin.
The NuAT paper (Sriramanan et al. 2021) reports "GAMA 100": :func:`gama_pgd` with its defaults.

Source of every detail: the authors' code, val-iisc/GAMA-GAT, ``GAMA/GAMA_PGD.py`` and
``GAMA/GAMA_FW.py`` (read for this module; no code copied). What it does, and what this module does:

* Start: a Bernoulli perturbation of exactly +-eps per coordinate (official: ``eps * sign(U)``).
  Here the start is also clamped to ``bounds`` (as every start in :mod:`advtrain.attacks.core`), so the model
  never sees an input outside the box; the official code evaluates the unclamped ``x + noise`` in the
  first iteration and for p(x0). The two agree wherever x is at least eps inside the box.
* p(x0) is the prediction at that random start point, not at the clean input (official code; the
  paper writes the clean input). It is computed once, without gradient; the official code recomputes
  it every iteration with the same model in eval mode, which gives the same values.
* Weight: ``w_t = weight * max(0, 1 - t / weight_decay_steps)`` for iteration t = 0, 1, ... The
  official code starts at ``w_reg`` and subtracts ``w_reg / lin`` after each iteration up to
  ``lin`` (``step <= lin`` in GAMA-PGD, ``step < lin`` in GAMA-FW); both give exactly this
  sequence (50, 48, ..., 2, 0, 0, ... for 50 and 25), 0 from t = 25 on.
* Step sizes: divided by ``drop_factor`` at each iteration listed in ``step_drops``, before that
  iteration's step (official: ``if step in SCHED: eps_iter /= drop``). GAMA-PGD: 16/255, /10 at 60
  and 85 (so 1.6/255 for t in [60, 85), 0.16/255 from 85). GAMA-FW: gamma 0.5, /5 at 60 and 85.
* Update, GAMA-PGD: ``x <- proj(x + step_t * sign(grad))`` onto the Linf ball and the box (the
  official code clamps to the box, then the ball; for a box that contains x both orders give the
  same point). GAMA-FW: ``x <- (1 - gamma_t) x + gamma_t (x0 + eps * sign(grad))`` with x0 the clean
  input (the Linf ball's linear-minimization oracle), then clamped to the box (and, against
  rounding, the ball).
* The returned point is the LAST iterate of each run, not the best one seen: the official code keeps
  no best iterate. Over ``restarts`` each example keeps its worst case exactly as
  :func:`advtrain.attacks.core.projected_gradient` does: misclassified beats correct, then the larger logit
  margin max_{j != y} z_j - z_y wins (the official evaluation counts an example robust only if every
  restart fails, which this reproduces).
* The official code divides the loss by the batch size and scales the step by the box width per
  channel; neither changes a signed step for [0, 1] inputs. Here the loss is summed per example
  (the sign of each example's gradient is the same) and steps are in the input's natural range.

The loop follows the package's rules: input-only gradients (``torch.autograd.grad``), no ``.item()``
or branch on a tensor value (the schedules are Python floats fixed before the loop), iterates kept in
float32 when the model runs under bf16 autocast (the loss is taken on float32 softmax outputs), all
randomness from ``generator``. The caller sets the model's mode (:func:`advtrain.attacks.mode.attack_mode`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .budget import check_steps, parse_budget
from .core import bernoulli_start, check_inputs, input_gradient, project, worst_of_restarts
from .losses import margin


def gama_loss(probs_adv: Tensor, probs_clean: Tensor, y: Tensor, weight: float) -> Tensor:
    """GAMA's objective per example, shape (B,); the attack maximizes it.

    ``max_{j != y} p_j(x~) - p_y(x~) + weight * sum_c (p_c(x0) - p_c(x~))^2`` with ``probs_adv`` =
    p(x~) and ``probs_clean`` = p(x0), softmax probabilities of shape (B, K). Gradients flow through
    both arguments; the attacks pass a detached ``probs_clean``.
    """
    probs_adv = probs_adv.float()
    objective = margin(probs_adv, y)  # max_{j != y} p_j - p_y
    if isinstance(weight, Tensor) or weight != 0:  # no branch on a tensor value
        objective = objective + weight * (probs_clean.float() - probs_adv).square().sum(1)
    return objective


def gama_weight_schedule(steps: int, weight: float = 50.0, weight_decay_steps: int = 25) -> list[float]:
    """The relaxation weight at each iteration: ``w_t = weight * max(0, 1 - t / weight_decay_steps)``,
    t = 0 .. steps - 1 (50, 48, ..., 2 at t = 24, then 0 from t = 25 on with the defaults), computed as
    ``weight * max(0, weight_decay_steps - t) / weight_decay_steps`` so that these values are exact.
    ``weight_decay_steps = 0`` switches the relaxation term off."""
    check_steps(steps, "steps")
    weight = _finite_nonnegative(weight, "weight")
    if isinstance(weight_decay_steps, bool) or not isinstance(weight_decay_steps, int) or weight_decay_steps < 0:
        raise ValueError(f"weight_decay_steps must be an integer >= 0, got {weight_decay_steps!r}")
    if weight_decay_steps == 0:
        return [0.0] * steps
    return [weight * max(0, weight_decay_steps - t) / weight_decay_steps for t in range(steps)]


def gama_step_schedule(steps: int, step: float | str = "16/255", step_drops: Sequence[int] = (60, 85),
                       drop_factor: float = 10.0) -> list[float]:
    """The step size at each iteration t = 0 .. steps - 1: ``step``, divided by ``drop_factor`` at every
    iteration in ``step_drops`` before that iteration's step (16/255, then 1.6/255 from t = 60,
    0.16/255 from t = 85 with GAMA-PGD's defaults). Divisions are applied one after another, as the
    official code does, so values agree with it to the last bit."""
    check_steps(steps, "steps")
    size = parse_budget(step, "step")
    drop_factor = _finite_nonnegative(drop_factor, "drop_factor")
    if drop_factor == 0:
        raise ValueError("drop_factor must be > 0")
    drops = set()
    for d in step_drops:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"step_drops must be iteration numbers >= 0, got {d!r}")
        drops.add(d)
    sizes = []
    for t in range(steps):
        if t in drops:
            size /= drop_factor
        sizes.append(size)
    return sizes


def gama_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | str,
    *,
    steps: int = 100,
    step: float | str = "16/255",
    weight: float = 50.0,
    weight_decay_steps: int = 25,
    step_drops: Sequence[int] = (60, 85),
    drop_factor: float = 10.0,
    restarts: int = 1,
    bounds: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """GAMA-PGD (Linf): signed gradient ascent on :func:`gama_loss`; returns ``x_adv`` (detached).

    Start: ``x + eps * (+-1)`` per coordinate (Bernoulli, from ``generator``), clamped to ``bounds``.
    p(x0) is the model's softmax at that random start point, as in the official code (not at the
    clean x). Iteration t (0-based) takes the gradient of gama_loss with weight
    ``w_t = weight * max(0, 1 - t / weight_decay_steps)`` (:func:`gama_weight_schedule`), steps by
    ``step_t * sign(grad)`` (:func:`gama_step_schedule`: ``step`` divided by ``drop_factor`` at each
    iteration in ``step_drops``) and projects onto the eps-ball and the box. Defaults are the
    official evaluation's: 100 steps, step 16/255 dropped tenfold at 60 and 85, weight 50 decaying to
    0 over 25 iterations (the official evaluation uses 5 restarts; "GAMA 100" in the NuAT paper).

    Each run returns its last iterate (the official code keeps no best iterate). With
    ``restarts > 1`` the attack runs again from new Bernoulli starts and keeps, per example, the
    worst case: a misclassified result beats a correct one, then the larger logit margin wins.
    """
    eps = parse_budget(eps, "eps")
    sizes = gama_step_schedule(steps, step, step_drops, drop_factor)
    weights = gama_weight_schedule(steps, weight, weight_decay_steps)

    def update(x_adv: Tensor, x: Tensor, grad: Tensor, size: float) -> Tensor:
        return x_adv + size * grad.sign()

    return _gama(model, x, y, eps, sizes, weights, update, restarts, bounds, generator)


def gama_fw(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | str,
    *,
    steps: int = 100,
    gamma: float = 0.5,
    weight: float = 50.0,
    weight_decay_steps: int = 25,
    step_drops: Sequence[int] = (60, 85),
    drop_factor: float = 5.0,
    restarts: int = 1,
    bounds: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """GAMA-FW (Linf): Frank-Wolfe ascent on :func:`gama_loss`; returns ``x_adv`` (detached).

    Same start, p(x0) (at the random start point), weight schedule and restarts as :func:`gama_pgd`.
    Iteration t moves toward the vertex of the eps-ball that maximizes the linearized loss:
    ``x_{t+1} = (1 - gamma_t) x_t + gamma_t (x + eps * sign(grad))``, x the clean input, then clamps
    to ``bounds`` (and to the ball, against rounding). ``gamma_t`` is ``gamma`` divided by
    ``drop_factor`` at each iteration in ``step_drops`` (:func:`gama_step_schedule`). Defaults are the
    official GAMA_FW.py's: 100 steps, gamma 0.5 dropped fivefold at 60 and 85 (0.5, 0.1, 0.02),
    weight 50 decaying to 0 over 25 iterations. Each run returns its last iterate.
    """
    eps = parse_budget(eps, "eps")
    if parse_budget(gamma, "gamma") > 1:
        raise ValueError(f"gamma must be in [0, 1] (a convex combination), got {gamma!r}")
    sizes = gama_step_schedule(steps, gamma, step_drops, drop_factor)
    weights = gama_weight_schedule(steps, weight, weight_decay_steps)

    def update(x_adv: Tensor, x: Tensor, grad: Tensor, size: float) -> Tensor:
        return x + (1 - size) * (x_adv - x) + size * eps * grad.sign()

    return _gama(model, x, y, eps, sizes, weights, update, restarts, bounds, generator)


Update = Callable[[Tensor, Tensor, Tensor, float], Tensor]


def _finite_nonnegative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _gama(model: nn.Module, x: Tensor, y: Tensor, eps: float, sizes: list[float], weights: list[float],
          update: Update, restarts: int, bounds: tuple[float, float],
          generator: torch.Generator | None) -> Tensor:
    check_steps(restarts, "restarts")
    check_inputs(x, y)
    x = x.detach()

    def run() -> Tensor:
        return _run(model, x, y, eps, sizes, weights, update, bounds, generator)

    return worst_of_restarts(model, x, y, restarts, run, margin)


def _run(model, x, y, eps, sizes, weights, update, bounds, generator):
    x_adv = project(x + bernoulli_start(x, eps, generator), x, eps, "linf", bounds)
    probs_clean = None
    if any(w > 0 for w in weights):  # Python floats: no host sync
        with torch.no_grad():
            probs_clean = F.softmax(model(x_adv).float(), dim=1)  # p(x0) at the random start point
    for size, weight in zip(sizes, weights):
        x_adv.requires_grad_(True)
        with torch.enable_grad():  # also when called from a no_grad evaluation loop
            probs_adv = F.softmax(model(x_adv).float(), dim=1)
            objective = gama_loss(probs_adv, probs_clean, y, weight) if weight > 0 else margin(probs_adv, y)
            grad = input_gradient(objective.sum(), x_adv)
        x_adv = project(update(x_adv.detach(), x, grad, size), x, eps, "linf", bounds)
    return x_adv.detach()


__all__ = ["gama_fw", "gama_loss", "gama_pgd", "gama_step_schedule", "gama_weight_schedule"]
