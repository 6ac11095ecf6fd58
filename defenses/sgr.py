"""SGR: structured gradient regularization, and GN, its identity-covariance case.

Roth, Kilcher and Hofmann, "Adversarially Robust Training through Structured Gradient Regularization" (arXiv
1805.08736, 2018; equations reconstructed from the ICLR-2019 submission in docs/methods.md, section SGR). No
official code exists: every implementation choice below that the paper does not state is marked "our choice".

The loss (eq. 11) is

    L = E[-log p_y(x)] + lam * Omega,     Omega = 1/2 E_i[ g_i^T Sigma g_i ],     g_i = grad_x log p_{y_i}(x_i),

g_i the input gradient of each example's own log-likelihood at its TRUE label, Sigma the raw second moments of
adversarial perturbations kept by :class:`~advtrain.callbacks.CovarianceTracker` (its ``covariance``: an object with
``matvec(g)`` and ``mean``). The uncentred variant (eq. 12) adds ``-E_i[g_i^T mu]``, mu the running mean
perturbation. Omega is differentiated with respect to the weights by double backprop
(``torch.autograd.grad(..., create_graph=True)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from advtrain.networks.wrapper import temporarily_set

from .base import AdversarialDefense
from .outputs import DefenseOutput

SIGMAS = ("tracked", "identity")
BATCHNORM_POLICIES = ("eval", "error")


def _wide(t: Tensor) -> Tensor:
    """float32 for half-precision tensors (bf16 autocast), the tensor's own dtype otherwise (float64 tests stay
    float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def log_likelihood_gradient(network: nn.Module, x: Tensor, y: Tensor,
                            create_graph: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(logits, summed log-likelihood sum_i log p_{y_i}(x_i), g) with g[i] = grad_x log p_{y_i}(x_i).

    One forward and one input-only backward: the gradient of the SUMMED log-likelihood is every example's own
    gradient at once, as long as example i's output depends on x_i alone (no train-mode BatchNorm: see
    :class:`SGR`). ``create_graph`` keeps the backward differentiable, so a loss built from g can be
    backpropagated to the weights (double backprop).
    """
    with torch.enable_grad():  # g is needed even where the caller turned gradients off (a no_grad loss probe)
        x = x.detach().requires_grad_(True)
        logits = network(x)
        log_likelihood = -F.cross_entropy(_wide(logits), y, reduction="sum")
        (g,) = torch.autograd.grad(log_likelihood, x, create_graph=create_graph)
    return logits, log_likelihood, g


def train_mode_batchnorms(network: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers that normalize with the batch's statistics now (train mode or no running stats)."""
    return [m for m in network.modules()
            if isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats)]


def batchnorm_eval(network: nn.Module):
    """Put every BatchNorm layer in eval mode (running statistics, no update) and leave dropout as it is;
    restore each layer's own flag afterwards."""
    return temporarily_set([m for m in network.modules() if isinstance(m, _BatchNorm)], "training", False)


class SGR(AdversarialDefense):
    """Structured gradient regularization: CE + lam * 1/2 mean_i g_i^T Sigma g_i (eq. 11).

    Args:
        network: the classifier (the paper's is ``advtrain.networks.CarliniCNN``, trained with Adam).
        lam: the regularization strength lambda. The paper's best values are lost (docs/methods.md): our default 1.
            With Sigma scaled to the data's mean variance (the tracker's ``scale: data``, arXiv) lambda reads as a
            noise-to-signal ratio.
        sigma: ``tracked``: Sigma is ``self.covariance``, the :class:`~advtrain.callbacks.CovarianceTracker`'s
            (fit refuses to start without it); ``identity``: Sigma = I, which is GN (:class:`GN`).
        uncentred: add the mean correction of eq. 12, ``-mean_i g_i^T mu`` with mu = ``self.covariance.mean``
            (also needs the tracker); the paper found it small, so it is off by default.
        batchnorm: what to do with BatchNorm layers in train mode, which normalize with the batch's statistics so
            that example i's output depends on every x_j and the gradient of the summed log-likelihood would mix
            examples. ``eval`` (default, our choice): the CE forward stays the ordinary train-mode forward
            (running statistics update as usual), and g comes from a second forward with BatchNorm in eval mode
            (running statistics), where g_i is example i's own. ``error``: refuse BatchNorm networks. A BatchNorm
            without running statistics is refused in either case (eval mode would still mix examples).
        **kwargs: the base class's arguments (optimizer, lr_scheduler, eps and validation settings).

    Dropout (the C&W CNN has dropout 0.5): for networks without train-mode BatchNorm, CE and g come from ONE
    forward, so the regularizer sees the same dropout mask as the CE term: Omega penalizes the input gradient of
    the very thinned network whose likelihood is maximized. The paper does not say; our choice, and the cheapest
    (one forward, one input-only backward with ``create_graph``, one backward through both). With train-mode
    BatchNorm the gradient forward is a second forward and draws its own dropout mask.

    Logged parts: ``ce``, ``omega`` (1/2 mean g^T Sigma g), ``mean_term`` (uncentred only: -mean g^T mu), ``lam``.
    The step's extras carry ``input_gradient``: g (detached), the gradient of each example's log-likelihood
    log p_y, i.e. MINUS the gradient of its cross-entropy, at the true label and in train mode (for callbacks;
    ``callbacks.CovarianceTracker``'s ``gradient`` source computes its own at the predicted label, in eval mode).
    """

    def __init__(self, network: nn.Module, lam: float = 1.0, sigma: str = "tracked", uncentred: bool = False,
                 batchnorm: str = "eval", **kwargs):
        super().__init__(network, **kwargs)
        if self.compile_network:
            raise ValueError(f"{type(self).__name__} backpropagates through the input gradient (a double backward), "
                             "which torch.compile (aot_autograd) does not support; set model.init_args.compile false")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        if sigma not in SIGMAS:
            raise ValueError(f"unknown sigma {sigma!r}; choose one of {', '.join(SIGMAS)}")
        if batchnorm not in BATCHNORM_POLICIES:
            raise ValueError(f"unknown batchnorm policy {batchnorm!r}; choose one of {', '.join(BATCHNORM_POLICIES)}")
        self.lam, self.sigma, self.uncentred, self.batchnorm = float(lam), sigma, bool(uncentred), batchnorm
        self.fixed_covariance = None  # a Sigma given by hand, for use without a trainer

    @property
    def covariance(self):
        """Sigma: the covariance tracker's (a callback offering ``covariance``, found in ``trainer.callbacks``),
        kept updated by it; without one, ``fixed_covariance``."""
        tracker = self.callback_with("covariance")
        return tracker.covariance if tracker is not None else self.fixed_covariance

    @property
    def needs_covariance(self) -> bool:
        return self.sigma == "tracked" or self.uncentred

    def on_fit_start(self) -> None:
        if self.needs_covariance and self.covariance is None:
            what = "sigma: tracked" if self.sigma == "tracked" else "uncentred: true"
            raise ValueError(f"{type(self).__name__} with {what} needs the covariance-tracking callback: add "
                             "{class_path: advtrain.callbacks.CovarianceTracker} to trainer.callbacks (or use sigma: "
                             "identity)")
        self._check_batchnorm(train_mode_batchnorms(self.network))

    def _check_batchnorm(self, batchnorms: list[_BatchNorm]) -> None:
        if not batchnorms:
            return
        if any(not m.track_running_stats for m in batchnorms):
            raise ValueError(f"{type(self).__name__}: a BatchNorm layer without running statistics mixes examples "
                             "in every mode, so g_i would not be example i's own gradient: use "
                             "track_running_stats=True or a network without BatchNorm")
        if self.batchnorm == "error":
            raise ValueError(f"{type(self).__name__} with batchnorm: error refuses a network with BatchNorm in "
                             "train mode (its per-example gradients would mix examples); set batchnorm: eval")

    def sigma_times(self, g: Tensor) -> Tensor:
        """Sigma g_i for every example (g of shape (B, *input_shape))."""
        if self.sigma == "identity":
            return g
        return self.covariance.matvec(g)

    def defense_loss(self, x: Tensor, y: Tensor, batch_idx: int) -> DefenseOutput:
        batchnorms = train_mode_batchnorms(self.network)  # module flags, not tensor values: no sync
        if not batchnorms:
            logits, log_likelihood, g = log_likelihood_gradient(self.network, x, y)
            ce = -log_likelihood / x.shape[0]
        else:
            self._check_batchnorm(batchnorms)
            logits = self.network(x)  # the ordinary training forward: CE and the running-statistics update
            ce = F.cross_entropy(_wide(logits), y)
            with batchnorm_eval(self.network):
                _, _, g = log_likelihood_gradient(self.network, x, y)
        g_flat = _wide(g.flatten(1))
        omega = 0.5 * (g_flat * _wide(self.sigma_times(g).flatten(1))).sum(1).mean()
        regularizer = omega
        # lam goes to the log as a CPU tensor: a Python float would be copied to the device every step
        parts = {"ce": ce, "omega": omega, "lam": torch.tensor(self.lam)}
        if self.uncentred:
            mu = self.covariance.mean.reshape(-1).to(g_flat)
            with torch.autocast(g_flat.device.type, enabled=False):  # a matrix product: bf16 under bf16-mixed
                mean_term = -(g_flat @ mu).mean()
            regularizer = regularizer + mean_term
            parts["mean_term"] = mean_term
        loss = ce + self.lam * regularizer
        return DefenseOutput(loss, parts, logits_clean=logits, input_gradient=g.detach())


class GN(SGR):
    """Gradient-norm regularization: SGR with Sigma = I, CE + lam * 1/2 mean_i ||g_i||^2 (the paper's GN row).

    Sigma = I has mean diagonal 1 (the ICLR scaling); an SGR lambda under the arXiv scaling (Sigma's mean
    diagonal = the data's mean variance) is therefore not the same lambda as GN's.
    """

    def __init__(self, network: nn.Module, lam: float = 1.0, uncentred: bool = False, batchnorm: str = "eval",
                 **kwargs):
        super().__init__(network, lam=lam, sigma="identity", uncentred=uncentred, batchnorm=batchnorm, **kwargs)
