"""Targeted PGD toward a random class, and the multi-targeted attack of the ADR paper.

Targeted PGD (Madry et al. 2018 with a target): from a uniform random start in the eps-ball, ``steps``
steps of size ``step`` along sign(g) (Linf) or g / ||g||_2 (L2), each followed by projection onto the
ball and the box, where g is the input gradient of -CE(f(x_adv), t): the attack pulls the prediction
toward the target class t instead of away from the true label y.

* ``target="random"``: t uniform among the classes other than y (SGR's "targeted PGD toward a random
  class"); every restart of an example keeps its target.
* ``target="all"``: the multi-targeted attack of Bui et al. 2020 (ADR, supplementary Tables 3-4): one
  targeted run toward each t = (y + k) mod K, k = 1..K-1, each with ``restarts``. An example counts as
  robust only if it survives every run, so the worst case over all runs is returned.

The same two target modes exist for BIM (:func:`bim_targeted`: no random start, Kurakin et al. 2017) and MIM
(:func:`mim_targeted`: momentum on the L1-normalized gradient, decay 1.0, Dong et al. 2018), which the ADR
supplementary's Tables 3-4 report untargeted and multiple-targeted beside PGD.

Whatever the target, the runs are ranked against the TRUE label y (a robust accuracy is measured as
prediction == y): a result misclassified w.r.t. y beats a correct one, then the larger margin
max_{j != y} f_j - f_y wins (:func:`advtrain.attacks.core.worst_of_restarts` with
:func:`advtrain.attacks.losses.margin`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .budget import check_steps, parse_budget
from .core import check_inputs, projected_gradient, worst_of_restarts
from .losses import cross_entropy, margin
from .standard import bim_steps

TARGETS = ("random", "all")


def toward_target(logits: Tensor, target: Tensor) -> Tensor:
    """-CE(logits, target) per example: maximizing it minimizes the cross-entropy toward the target."""
    return -cross_entropy(logits, target)


def pgd_targeted(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, step: float | str | None = None,
                 steps: int = 10, norm: str = "linf", target: str = "random", restarts: int = 1, eot: int = 1,
                 bounds: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None) -> Tensor:
    """Targeted PGD (``target="random"``) or multi-targeted PGD (``target="all"``, ADR); see the module
    docstring. Step defaults to 2.5 eps / steps, as :func:`advtrain.attacks.standard.pgd`. ``target="all"`` costs
    K - 1 times a targeted run (K classes); ``eot`` averages each gradient over draws of a randomized model.
    """
    eps = parse_budget(eps)
    check_steps(steps, "steps")
    step = 2.5 * eps / steps if step is None else step
    return _targeted_runs(model, x, y, eps, step, steps, norm, target, restarts, eot, bounds, generator,
                          start="uniform", momentum=None)


def bim_targeted(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, step: float | str = 1 / 255,
                 steps: int | None = None, target: str = "random", eot: int = 1,
                 bounds: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None) -> Tensor:
    """Targeted BIM: :func:`advtrain.attacks.standard.bim` (no random start, so no restarts) toward the target(s) of
    ``target``; defaults as bim (step 1/255, Kurakin's iteration count). With ``target="all"`` it is
    deterministic; ``generator`` only draws the random target."""
    eps = parse_budget(eps)
    steps = bim_steps(eps) if steps is None else steps
    return _targeted_runs(model, x, y, eps, step, steps, "linf", target, 1, eot, bounds, generator,
                          start="zero", momentum=None)


def mim_targeted(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, step: float | str | None = None,
                 steps: int = 10, decay: float = 1.0, target: str = "random", eot: int = 1,
                 bounds: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None) -> Tensor:
    """Targeted MIM: :func:`advtrain.attacks.standard.mim` (momentum ``decay`` on the L1-normalized gradient, no random
    start) toward the target(s) of ``target``; each target's run starts with zero momentum. Step defaults to
    eps / steps, as mim."""
    eps = parse_budget(eps)
    check_steps(steps, "steps")
    step = eps / steps if step is None else step
    return _targeted_runs(model, x, y, eps, step, steps, "linf", target, 1, eot, bounds, generator,
                          start="zero", momentum=decay)


def _targeted_runs(model, x, y, eps, step, steps, norm, target, restarts, eot, bounds, generator, *, start,
                   momentum) -> Tensor:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    check_steps(steps, "steps")
    check_steps(restarts, "restarts")
    check_inputs(x, y)
    x = x.detach()
    with torch.no_grad():
        classes = model(x).shape[1]  # a shape, not a value: no host sync
    if classes < 2:
        raise ValueError(f"a targeted attack needs at least 2 classes, the model has {classes}")
    if target == "random":
        # y + U{1, ..., K-1} mod K is uniform over the classes other than y
        offsets = torch.randint(1, classes, y.shape, generator=generator, device=y.device)
        targets = [(y + offsets) % classes]
    else:
        targets = [(y + k) % classes for k in range(1, classes)]
    # one queue of runs, target-major, so one worst_of_restarts ranks every run of every target
    queue = iter([t for t in targets for _ in range(restarts)])

    def run() -> Tensor:
        return projected_gradient(model, x, next(queue), eps=eps, step=step, steps=steps, norm=norm,
                                  loss=toward_target, start=start, momentum=momentum, eot=eot, bounds=bounds,
                                  generator=generator)

    return worst_of_restarts(model, x, y, len(targets) * restarts, run, margin)
