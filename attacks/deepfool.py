"""DeepFool (Moosavi-Dezfooli et al., CVPR 2016), L2 and untargeted, batched, as the SGR paper ran it (CleverHans)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .core import check_inputs

LINEARIZE = ("clipped", "overshoot")
_SMOOTH = 1e-5  # CleverHans adds it to |f'_k| so that a point on the boundary still moves


def deepfool(model: nn.Module, x: Tensor, y: Tensor, *, steps: int = 50, overshoot: float = 0.02, candidates: int = 10,
             linearize: str = "clipped", bounds: tuple[float, float] = (0.0, 1.0),
             generator: torch.Generator | None = None) -> Tensor:
    """DeepFool, 'A simple and accurate method to fool deep neural networks' (Moosavi-Dezfooli, Fawzi and
    Frossard, CVPR 2016): the smallest L2 step to the nearest boundary of the model linearized at the
    current iterate, repeated until the prediction changes. Returns x_adv (detached, x's dtype).

    Reference class k^ = argmax f(x0), the prediction: ``y`` is accepted for the attacks' common signature
    but unused (an example the model already gets wrong is attacked all the same). Candidates: the top
    ``candidates`` classes of the original logits f(x0) (k^ first, at most the number of classes).
    Each iteration, for every example whose prediction is still k^ and every candidate k != k^, at the
    iterate x_i::

        w_k = grad f_k(x_i) - grad f_k^(x_i),   f'_k = f_k(x_i) - f_k^(x_i)
        l = argmin_k (|f'_k| + 1e-5) / ||w_k||_2                      (the first minimum on ties)
        r_i = (|f'_l| + 1e-5) w_l / ||w_l||_2^2,   r_tot += r_i

    then the next iterate is x_i = clip(x0 + r_tot, bounds) (``linearize="clipped"``, CleverHans) or
    x_i = x0 + (1 + overshoot) r_tot, unclipped (``"overshoot"``, the authors' LTS4 code). An example stops
    when argmax f(x_i) != k^, after at most ``steps`` iterations. Every example, flipped or not, returns
    x_adv = clip(x0 + (1 + overshoot) r_tot, bounds).

    Differences from the references: CleverHans re-ranks the top ``candidates`` classes at every iterate;
    with at most ``candidates`` classes (10 on CIFAR-10/MNIST) both use all classes, so the results are the
    same (tests/attacks/test_deepfool.py checks it against a literal one-example-at-a-time CleverHans loop); with fewer
    candidates than classes the two may differ. LTS4 adds 1e-4 to the step, not 1e-5, and leaves the argmin
    without it; torchattacks starts from the true label, not the prediction. A candidate with a zero gradient
    difference is skipped (an example with no usable candidate stays where it is) instead of producing NaN.

    Cost per iteration: one forward of the examples still active and one input-only backward per candidate
    other than k^ (the gradient of sum(f_k - f_k^) is w_k directly; one vmapped backward with
    is_grads_batched measured slower on a CPU ResNet-18). One host sync per iteration decides
    which examples are still active. The caller sets the model's mode; ``generator`` is unused (DeepFool is
    deterministic) and accepted for the common signature. Works under torch.no_grad() and bf16 autocast
    (differences and norms are computed in float32 or x's dtype if wider).
    """
    x_adv, _ = deepfool_iterations(model, x, y, steps=steps, overshoot=overshoot, candidates=candidates,
                                   linearize=linearize, bounds=bounds)
    return x_adv


def deepfool_iterations(model: nn.Module, x: Tensor, y: Tensor, *, steps: int = 50, overshoot: float = 0.02,
                        candidates: int = 10, linearize: str = "clipped",
                        bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[Tensor, Tensor]:
    """:func:`deepfool` that also returns how many iterations (updates of r_tot) each example used, (B,) int64."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not overshoot >= 0:  # also rejects NaN
        raise ValueError(f"overshoot must be >= 0, got {overshoot!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2:
        raise ValueError(f"candidates must be an integer >= 2 (k^ and at least one other class), got {candidates!r}")
    if linearize not in LINEARIZE:
        raise ValueError(f"unknown linearize {linearize!r}; choose one of {', '.join(LINEARIZE)}")
    check_inputs(x, y)

    x0 = x.detach()
    work = torch.promote_types(x.dtype, torch.float32)  # bf16 logits and gradients are compared in float32
    r_tot = torch.zeros(x0.shape, dtype=work, device=x0.device)
    iterations = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
    x_i = x0.clone()
    active = torch.arange(x0.shape[0], device=x0.device)  # indices of the examples still predicted k^
    top = None
    with torch.enable_grad():  # an evaluation loop may call us under no_grad
        for _ in range(steps):
            x_active = x_i[active].requires_grad_(True)
            logits = model(x_active).to(work)
            if top is None:  # the first iterate is x0: rank the candidates once, on the original logits
                top = logits.topk(min(candidates, logits.shape[1]), dim=1).indices
            still = logits.argmax(dim=1) == top[active, 0]
            keep = still.nonzero().squeeze(1)  # the one host sync of the iteration
            if keep.numel() == 0:
                break
            active = active[keep]
            f = logits[keep].gather(1, top[active])
            r_i = _step(f[:, 1:] - f[:, :1], x_active, keep)
            r_tot[active] += r_i
            iterations[active] += 1
            x_i[active] = _iterate(x0[active], r_tot[active], linearize, overshoot, bounds)
    x_adv = (x0.to(work) + (1 + overshoot) * r_tot).clamp(*bounds).to(x.dtype)
    return x_adv, iterations


def _step(f_diff: Tensor, x_active: Tensor, keep: Tensor) -> Tensor:
    """r_i for the kept rows: f_diff (b, C-1) holds f_k - f_k^ as a function of ``x_active`` (rows ``keep``).

    The candidates are scanned with a running minimum, so only one w_k per example is held at a time (an
    ImageNet batch times nine candidates would not fit); strict < keeps the first minimum, as CleverHans."""
    work = f_diff.dtype
    best_pert = torch.full((f_diff.shape[0],), float("inf"), dtype=work, device=f_diff.device)
    best_scale = torch.zeros_like(best_pert)
    best_w = None
    n = f_diff.shape[1]
    for k in range(n):
        (grad,) = torch.autograd.grad(f_diff[:, k].sum(), x_active, retain_graph=k < n - 1, allow_unused=True)
        w = torch.zeros_like(x_active[keep], dtype=work) if grad is None else grad[keep].to(work)
        w = w.flatten(1)
        norm = w.norm(dim=1)
        size = f_diff[:, k].detach().abs() + _SMOOTH
        pert = torch.where(norm > 0, size / norm, torch.inf)  # a zero gradient is no direction
        better = pert < best_pert
        best_pert = torch.where(better, pert, best_pert)
        # r_i = pert * w / ||w||: keep the scale pert / ||w|| with w (0 while no candidate qualified)
        best_scale = torch.where(better, pert / norm.clamp_min(torch.finfo(work).tiny), best_scale)
        best_w = w if best_w is None else torch.where(better[:, None], w, best_w)
    return (best_w * best_scale[:, None]).view(-1, *x_active.shape[1:])


def _iterate(x0: Tensor, r_tot: Tensor, linearize: str, overshoot: float, bounds: tuple[float, float]) -> Tensor:
    """The point of the next linearization (and of the stopping test), in x0's dtype."""
    if linearize == "clipped":
        return (x0.to(r_tot.dtype) + r_tot).clamp(*bounds).to(x0.dtype)
    return (x0.to(r_tot.dtype) + (1 + overshoot) * r_tot).to(x0.dtype)


__all__ = ["LINEARIZE", "deepfool", "deepfool_iterations"]
