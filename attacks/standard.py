"""The standard first-order attacks, each a thin layer over :func:`advtrain.attacks.core.projected_gradient`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .budget import parse_budget
from .core import projected_gradient
from .losses import AttackLoss, cross_entropy, kl_from

# Default step sizes, each defined once: the functions below use them, and so do their rows in the attack table.
BIM_STEP = 1 / 255  # Kurakin et al., as the defensive-tensorization paper uses BIM


def fgsm_rs_step(eps: float) -> float:
    return 1.25 * eps  # Wong et al. 2020


def pgd_step(eps: float, steps: int) -> float:
    return 2.5 * eps / steps  # Madry et al.: enough to cross the ball and come back


def mim_step(eps: float, steps: int) -> float:
    return eps / steps  # Dong et al. 2018


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, loss: AttackLoss = cross_entropy,
         eot: int = 1, bounds: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None) -> Tensor:
    """FGSM (Goodfellow et al. 2015): x + eps * sign(grad_x L), clipped to the box. Every attack here takes
    ``eot``: the gradient averaged over that many draws of a randomized model (see ``projected_gradient``)."""
    return projected_gradient(model, x, y, eps=eps, step=eps, steps=1, loss=loss, eot=eot, bounds=bounds)


def fgsm_rs(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, step: float | str | None = None,
            loss: AttackLoss = cross_entropy, eot: int = 1, bounds: tuple[float, float] = (0.0, 1.0),
            generator: torch.Generator | None = None) -> Tensor:
    """FGSM with a uniform random start and a step of 1.25 eps (Wong et al. 2020, 'Fast is better
    than free'); the result is projected back onto the eps-ball."""
    eps = parse_budget(eps)
    step = fgsm_rs_step(eps) if step is None else step
    return projected_gradient(model, x, y, eps=eps, step=step, steps=1, start="uniform", loss=loss, eot=eot,
                              bounds=bounds, generator=generator)


def bim_steps(eps: float) -> int:
    """Kurakin et al.'s iteration count floor(min(eps + 4, 1.25 eps)) with eps in 1/255 units."""
    e = eps * 255
    return max(1, math.floor(min(e + 4, 1.25 * e) + 1e-9))


def bim(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, step: float | str = BIM_STEP,
        steps: int | None = None, loss: AttackLoss = cross_entropy, eot: int = 1,
        bounds: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None) -> Tensor:
    """BIM / I-FGSM (Kurakin et al. 2017): FGSM repeated with clipping, no random start. Defaults are
    the defensive-tensorization paper's: step 1/255, ``bim_steps(eps)`` iterations."""
    eps = parse_budget(eps)
    steps = bim_steps(eps) if steps is None else steps
    return projected_gradient(model, x, y, eps=eps, step=step, steps=steps, loss=loss, eot=eot, bounds=bounds)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, step: float | str | None = None,
        steps: int = 10, norm: str = "linf", random_start: bool = True, restarts: int = 1,
        loss: AttackLoss = cross_entropy, eot: int = 1, bounds: tuple[float, float] = (0.0, 1.0),
        generator: torch.Generator | None = None) -> Tensor:
    """PGD (Madry et al. 2018): BIM from a uniform random start in the ball, Linf or L2, with
    restarts that keep each example's worst case. Step defaults to 2.5 eps / steps."""
    eps = parse_budget(eps)
    step = pgd_step(eps, steps) if step is None else step
    return projected_gradient(model, x, y, eps=eps, step=step, steps=steps, norm=norm, loss=loss,
                              start="uniform" if random_start else "zero", restarts=restarts, eot=eot,
                              bounds=bounds, generator=generator)


def mim(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, step: float | str | None = None,
        steps: int = 10, decay: float = 1.0, loss: AttackLoss = cross_entropy, eot: int = 1,
        bounds: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None) -> Tensor:
    """MIM (Dong et al. 2018): signed steps along a momentum of L1-normalized gradients, decay 1.0,
    no random start (as torchattacks.MIFGSM). Step defaults to eps / steps."""
    eps = parse_budget(eps)
    step = mim_step(eps, steps) if step is None else step
    return projected_gradient(model, x, y, eps=eps, step=step, steps=steps, momentum=decay, loss=loss, eot=eot,
                              bounds=bounds)


def rfgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, alpha: float | str | None = None,
          loss: AttackLoss = cross_entropy, eot: int = 1, bounds: tuple[float, float] = (0.0, 1.0),
          generator: torch.Generator | None = None) -> Tensor:
    """R+FGSM (Tramèr et al. 2018, 'Ensemble Adversarial Training', eq. 7): a random step, then FGSM
    with the rest of the budget::

        x' = clip(x + alpha * sign(N(0, I)))
        x_adv = clip(x' + (eps - alpha) * sign(grad_x' L(x', y)))   (inside the eps-ball around x)

    alpha defaults to eps / 2 and must lie in [0, eps]. The random step is the ``bernoulli`` start of
    :func:`advtrain.attacks.core.projected_gradient` (+-alpha per coordinate with equal probability: the law of
    alpha * sign(N(0, I))), drawn from ``generator``. This is neither FGSM-RS (:func:`fgsm_rs`, Wong et al.
    2020: uniform start, one 1.25 eps step) nor torchattacks' ``RFGSM`` (a multi-step attack).
    """
    eps = parse_budget(eps)
    alpha = eps / 2 if alpha is None else parse_budget(alpha, "alpha")
    if alpha > eps:
        raise ValueError(f"R+FGSM needs 0 <= alpha <= eps, got alpha={alpha:g} > eps={eps:g}")
    return projected_gradient(model, x, y, eps=eps, step=eps - alpha, steps=1, start="bernoulli",
                              start_scale=alpha, loss=loss, eot=eot, bounds=bounds, generator=generator)


def trades_kl(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, clean_logits: Tensor,
              step: float | str = 2 / 255, steps: int = 10, eot: int = 1, bounds: tuple[float, float] = (0.0, 1.0),
              generator: torch.Generator | None = None) -> Tensor:
    """TRADES' inner maximization (Zhang et al. 2019, official code yaodongyu/TRADES): signed steps on
    KL(p(x) || p(x')) summed over the batch, from x + 0.001 N(0, I), in the eps-ball. ``clean_logits`` = f(x), from
    the defense that runs it (a training attack: its row declares it as context)."""
    return projected_gradient(model, x, y, eps=eps, step=step, steps=steps, loss=kl_from(clean_logits),
                              start="normal", start_scale=0.001, eot=eot, bounds=bounds, generator=generator)
