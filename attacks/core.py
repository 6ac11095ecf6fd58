"""One projected-gradient core for every first-order attack in the package.

FGSM, BIM, PGD (Linf and L2), MIM, the NuAT step and the TRADES/ADR inner maximizations are this
loop with a different loss, start and step rule. The loop never leaves the device: no ``.item()``,
no Python branch on a tensor value, and gradients are taken with respect to the input only
(``torch.autograd.grad``), which skips every weight gradient (about 30% cheaper than
``loss.backward()`` and it leaves ``.grad`` of the parameters untouched, which DDP relies on).

The caller decides the model's mode (see :func:`advtrain.attacks.mode.attack_mode`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .budget import check_steps, parse_budget
from .losses import AttackLoss, cross_entropy, misclassified

NORMS = ("linf", "l2")
STARTS = ("zero", "uniform", "bernoulli", "normal")
_TINY = 1e-12


def _per_example(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) tensor to broadcast against a batch shaped like ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _l2_norms(t: Tensor) -> Tensor:
    return t.flatten(1).norm(p=2, dim=1)


def bernoulli_start(x: Tensor, a: float, generator: torch.Generator | None = None) -> Tensor:
    """A perturbation whose entries are exactly +a or -a with equal probability (NuAT, GAMA)."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.where(u < 0.5, -a, a).to(x.dtype)


def random_start(x: Tensor, eps: float, kind: str = "uniform", norm: str = "linf",
                 scale: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """The initial perturbation of an attack.

    kind: ``zero``; ``uniform`` in the eps-ball (Linf: U(-eps, eps) per entry; L2: a Gaussian
    direction with a radius U(0, 1) * eps, as torchattacks' PGDL2); ``bernoulli`` (+-scale per entry,
    scale defaults to eps); ``normal`` (scale * N(0, 1), TRADES uses 0.001).
    """
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "bernoulli":
        return bernoulli_start(x, eps if scale is None else scale, generator)
    if kind == "normal":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return noise * (0.001 if scale is None else scale)
    if kind == "uniform":
        if norm == "linf":
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return (2 * u - 1) * eps
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        radius = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        return direction * _per_example(radius * eps / (_l2_norms(direction) + _TINY), x)
    raise ValueError(f"unknown start {kind!r}; choose one of {', '.join(STARTS)}")


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str, bounds: tuple[float, float]) -> Tensor:
    """Project onto the eps-ball around x, then onto the input box."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        factor = (eps / _l2_norms(delta)).clamp(max=1.0)  # inf for delta = 0 clamps to 1
        delta = delta * _per_example(factor, x)
    return (x + delta).clamp(*bounds)


def projected_gradient(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | str,
    step: float | str,
    steps: int,
    norm: str = "linf",
    loss: AttackLoss = cross_entropy,
    start: str | Tensor = "zero",
    start_scale: float | None = None,
    momentum: float | None = None,
    restarts: int = 1,
    eot: int = 1,
    bounds: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Maximize ``loss(model(x_adv), y)`` over the eps-ball around ``x``; return ``x_adv`` (detached).

    Each iteration: gradient of the summed per-example loss w.r.t. the input; optional momentum
    on the L1-normalized gradient (MIM, Dong et al. 2018); a step of ``step`` along sign(grad) (Linf)
    or grad / ||grad||_2 (L2); projection onto the ball and the box ``bounds``. The update order is
    torchattacks' (step on x_adv, clip x_adv - x, clamp), so results agree to the last bit.

    ``start`` names a random start (:func:`random_start`) or is a tensor: the starting point x_adv
    itself (multi-step schemes that change the loss or the model between steps, such as NuAT2).

    With ``restarts > 1`` the attack runs again from new random starts and keeps, per example, the
    worst case: a misclassified result beats a correct one, then the higher loss wins.

    ``eot > 1`` is expectation over transformation (Athalye et al. 2018) for randomized models: each
    iteration's gradient is the mean of the input gradients of ``eot`` forward passes, each with its own
    draw of the model's randomness (gradients are accumulated draw by draw, so memory stays one pass).
    """
    eps = parse_budget(eps, "eps")
    step = parse_budget(step, "step")
    check_steps(steps, "steps")
    check_steps(restarts, "restarts")
    check_steps(eot, "eot")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if not isinstance(start, Tensor) and start not in STARTS:
        raise ValueError(f"unknown start {start!r}; choose one of {', '.join(STARTS)}")
    check_inputs(x, y)
    x = x.detach()

    def run() -> Tensor:
        return _ascend(model, x, y, eps, step, steps, norm, loss, start, start_scale, momentum, eot, bounds,
                       generator)

    return worst_of_restarts(model, x, y, restarts, run, loss)


def input_gradient(objective: Tensor, x_adv: Tensor) -> Tensor:
    """d objective / d x_adv, and zeros where the model does not let a gradient reach its input (a
    masked-gradient defense must not crash its own evaluation; the sanity checks then flag it)."""
    if not objective.requires_grad:
        return torch.zeros_like(x_adv)
    (grad,) = torch.autograd.grad(objective, x_adv, allow_unused=True)
    return torch.zeros_like(x_adv) if grad is None else grad


def check_inputs(x: Tensor, y: Tensor) -> None:
    """What every attack needs of its inputs, said plainly when it is missing."""
    if not x.is_floating_point():
        raise TypeError(f"attacks take floating-point inputs in their natural range, got {x.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"batch sizes differ: x has {x.shape[0]}, y has {y.shape[0]}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("attacks need gradients, but inference mode is on: run them outside "
                           "torch.inference_mode() (Lightning: trainer.inference_mode=False)")


def worst_of_restarts(model: nn.Module, x: Tensor, y: Tensor, restarts: int, run: Callable[[], Tensor],
                      score: AttackLoss) -> Tensor:
    """Call ``run()`` ``restarts`` times; keep per example the worst case: a misclassified result beats a
    correct one, then the higher ``score(logits, y)`` wins. One run costs no extra forward."""
    best = best_score = best_mis = None
    for _ in range(restarts):
        x_adv = run()
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            logits = model(x_adv)
            run_score, run_mis = score(logits, y), misclassified(logits, y)
        if best is None:
            best, best_score, best_mis = x_adv, run_score, run_mis
            continue
        better = (run_mis & ~best_mis) | ((run_mis == best_mis) & (run_score > best_score))
        best = torch.where(_per_example(better, x), x_adv, best)
        best_score = torch.where(better, run_score, best_score)
        best_mis = best_mis | run_mis
    return best


def expected_input_gradient(model: nn.Module, loss: AttackLoss, x_adv: Tensor, y: Tensor, draws: int) -> Tensor:
    """Mean over ``draws`` forward passes of d sum(loss) / d x_adv (one pass: the plain gradient)."""
    grad = None
    for _ in range(draws):
        x_adv.requires_grad_(True)
        with torch.enable_grad():  # also when called from a no_grad evaluation loop
            g = input_gradient(loss(model(x_adv), y).sum(), x_adv)
        grad = g if grad is None else grad + g
    x_adv.requires_grad_(False)
    return grad if draws == 1 else grad / draws


def _ascend(model, x, y, eps, step, steps, norm, loss, start, start_scale, momentum, eot, bounds, generator):
    if isinstance(start, Tensor):
        x_adv = project(start.detach().to(x.dtype), x, eps, norm, bounds)
    else:
        x_adv = project(x + random_start(x, eps, start, norm, start_scale, generator), x, eps, norm, bounds)
    velocity = torch.zeros_like(x) if momentum is not None else None
    reduce_dims = tuple(range(1, x.dim()))
    for _ in range(steps):
        grad = expected_input_gradient(model, loss, x_adv, y, eot)
        x_adv = x_adv.detach()
        if velocity is not None:
            grad = grad / grad.abs().mean(reduce_dims, keepdim=True).clamp_min(_TINY)
            velocity = momentum * velocity + grad
            grad = velocity
        if norm == "linf":
            x_adv = x_adv + step * grad.sign()
        else:
            x_adv = x_adv + step * grad / _per_example(_l2_norms(grad) + 1e-10, x)
        x_adv = project(x_adv, x, eps, norm, bounds)
    return x_adv.detach()
