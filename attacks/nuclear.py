"""The nuclear-norm attacks of NuAT (Sriramanan et al., NeurIPS 2021; official code val-iisc/NuAT).

One signed step of eps from a Bernoulli start x0 = clip(x +- a) on

    L~ = CE(f(x0), y) + lambda * ||f(x0) - f(x)||_* / B,

the nuclear norm taken over the B x K matrix of logit differences of the whole batch, which pushes
the batch's predictions to change in diverse directions. The two-step variant (NuAT2) takes a second
eps step on plain CE; in NuAT2-WA the first step is measured on a (fast) weight-averaged network.

Host syncs: the one documented exception. The nuclear norm is a sum of singular values, and an SVD on CUDA
makes the host wait for the device (``torch.linalg`` reads the solver's error code back to the host so that it
can raise; there is no ``svd_ex`` that skips the check). This is the only host-device sync allowed in a training
step (docs/design.md, "Performance principles"): one per :func:`nuclear_norm` call, whatever the batch size, so a NuAT
training step pays one in its loss and one more in its attack on the batches that use the nuclear term. Its
backward (through the singular values only) is plain matrix products and never syncs. Everything else here keeps
to the rules of :mod:`advtrain.attacks.core`. ``tests/integration/test_gpu.py`` runs NuAT's step under
``torch.cuda.set_sync_debug_mode("error")`` with only the SVD exempted; ``tests/defenses/test_host_syncs.py`` counts
value reads on CPU outside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .budget import parse_budget
from .core import projected_gradient
from .losses import AttackLoss, cross_entropy


def nuclear_norm(matrix: Tensor) -> Tensor:
    """Sum of the singular values of a 2-D tensor (float32: the SVD is not done in bf16).

    On CUDA this is a host-device sync, the one a training step is allowed (see the module docstring): the SVD
    solver's error code is read back to the host. Call it once per batch matrix, never per example or in a loop
    that could be batched. Its gradient (``U diag(g) V^T``) does not sync.
    """
    return torch.linalg.matrix_norm(matrix.float(), ord="nuc")


def nuclear_loss(clean_logits: Tensor, lam: float) -> AttackLoss:
    """Per-example CE plus an equal share lambda * ||f(x~) - f(x)||_* / B of the batch term.

    The core sums the per-example values, so the gradient is B times that of the official
    CE_mean + lambda * ||.||_* / B: the same sign, the same attack.
    """
    clean = clean_logits.detach().float()

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        ce = F.cross_entropy(logits.float(), y, reduction="none")
        return ce + lam * nuclear_norm(logits.float() - clean) / y.shape[0]

    return loss


def nuclear_norm_step(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, clean_logits: Tensor,
                      lam: float, start_scale: float | str = "4/255", use_nuclear: bool = True,
                      bounds: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None) -> Tensor:
    """NuAT's single-step attack: x~ = clip(x + clip(x0 - x + eps sign(grad L~), -eps, eps), 0, 1).

    ``clean_logits`` are f(x) (the official code takes them from the training-mode forward of the clean
    batch); ``use_nuclear=False`` drops the nuclear term (the official code uses it on alternate
    minibatches only).

    Host syncs: with ``use_nuclear`` the step computes one :func:`nuclear_norm`, an SVD that syncs on CUDA (the
    documented exception); without it the step never syncs. The start, gradient, step and projection stay on
    the device (:func:`advtrain.attacks.core.projected_gradient`).
    """
    eps = parse_budget(eps)
    loss = nuclear_loss(clean_logits, lam) if use_nuclear else cross_entropy
    return projected_gradient(model, x, y, eps=eps, step=eps, steps=1, loss=loss, start="bernoulli",
                              start_scale=parse_budget(start_scale, "start_scale"), bounds=bounds,
                              generator=generator)


def nuclear_two_step(model: nn.Module, x: Tensor, y: Tensor, eps: float | str, *, clean_logits: Tensor, lam: float,
                     start_scale: float | str = "4/255", first_model: nn.Module | None = None,
                     first_clean_logits: Tensor | None = None, use_nuclear: bool = True,
                     bounds: tuple[float, float] = (0.0, 1.0), generator: torch.Generator | None = None) -> Tensor:
    """NuAT2: a nuclear-norm step of eps from the Bernoulli start, then a CE step of eps, both projected
    onto the eps-ball around x.

    NuAT2-WA: ``first_model`` (the fast weight average) and its logits ``first_clean_logits`` make the
    first step; the second is always on ``model``. Intermediate points are also clamped to ``bounds``.
    Host syncs: the first step's SVD only (see :func:`nuclear_norm_step`); the CE step never syncs.
    """
    first = model if first_model is None else first_model
    first_logits = clean_logits if first_clean_logits is None else first_clean_logits
    x1 = nuclear_norm_step(first, x, y, eps, clean_logits=first_logits, lam=lam, start_scale=start_scale,
                           use_nuclear=use_nuclear, bounds=bounds, generator=generator)
    eps = parse_budget(eps)
    return projected_gradient(model, x, y, eps=eps, step=eps, steps=1, start=x1, bounds=bounds)
