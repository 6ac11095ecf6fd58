"""Loss landscape: the loss on a 2-D grid around one input, and its contour plot (docs/methods.md, defensive
tensorization: axes = the input-gradient direction and a random direction orthogonal to it, [-0.5, 0.5]).

The surface can also be drawn with respect to the latent representation z (the ADR supplementary's Figs. 1-2,
Bui et al. 2020): :class:`LatentHead` is the classifier part from the latent layer as a module of z, so the same
two functions give the axes and the surface in latent space. ``advtrain.callbacks.LossLandscape`` runs them on chosen
evaluation points and writes the figures."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.attacks import ATTACKS, AttackSetting, attack_mode, stream_seed
from advtrain.networks.randomness import randomness_off

__all__ = ["LatentHead", "attack_setting", "landscape_directions", "loss_surface", "plot_surface"]

NORMS = ("linf", "l2")
AXIS_LABELS = ("gradient direction", "random orthogonal direction")




def _scaled(d: Tensor, normalize: str) -> Tensor:
    return d / (d.abs().amax() if normalize == "linf" else d.norm())


@contextmanager
def _seeded(device: torch.device, seed: int | None) -> Iterator[None]:
    """Seed the default generator of ``device`` (the one the network's random masks use) for the body, and
    restore the previous RNG state afterwards, so the landscape never consumes the global RNG."""
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class LatentHead(nn.Module):
    """``forward(z) = network.logits_from_latent(z)``: the rest of the network from its latent layer, as a module
    of z (flattened, ``(B, latent_dim)``), so that :func:`landscape_directions` and :func:`loss_surface` draw the
    loss surface with respect to z. The network is a submodule, so ``attack_mode`` and ``randomness_off``
    reach every one of its layers."""

    def __init__(self, network: nn.Module):
        super().__init__()
        if not (hasattr(network, "forward_with_latent") and hasattr(network, "logits_from_latent")):
            raise TypeError(f"{type(network).__name__} has no forward_with_latent / logits_from_latent, so it has no "
                            "latent surface; use a network of networks/ or space: input")
        self.network = network

    def forward(self, z: Tensor) -> Tensor:
        return self.network.logits_from_latent(z)


def attack_setting(attack: dict, default_eps: float | None, owner: str) -> AttackSetting:
    """One attack setting from its config entry, at ``default_eps`` (the module's training budget) unless the
    entry gives ``eps``; ``owner`` names the callback in the error."""
    given = dict(attack)
    if isinstance(given.get("eps"), list | tuple):
        raise ValueError(f"{owner} attack: give one eps, not a list ({given['eps']})")
    if ATTACKS[AttackSetting(**given).attack].budget and "eps" not in given:
        if default_eps is None:
            raise ValueError(f"{owner}: the module has no eps; give the attack's eps (attack: {{attack: pgd, "
                             "eps: 8/255}})")
        given["eps"] = float(default_eps)
    return AttackSetting(**given).expand()[0]


def landscape_directions(network: nn.Module, x: Tensor, y: Tensor | int, seed: int = 0,
                         normalize: str = "linf") -> tuple[Tensor, Tensor]:
    """The two axes of the landscape around one input ``x`` (shape of one example, no batch dimension).

    ``d1`` is the gradient of ``cross_entropy(network(x), y)`` with respect to ``x``, computed with the
    network's randomness off (every Tucker layer at theta = 1) and every submodule in eval mode (modes and
    thetas are restored afterwards). ``d2`` is a Gaussian direction drawn from a CPU generator seeded with
    ``seed`` (the same direction on every device) and made orthogonal to ``d1`` by Gram-Schmidt in the
    flattened input space. Each is then scaled to unit L-inf norm (``normalize="linf"``: an axis value is the
    largest per-pixel change, the papers' units) or unit L2 norm (``"l2"``); scaling keeps them orthogonal.

    A zero gradient (a saturated, correctly classified point) gives no direction: then ``d1`` is a second
    seeded random direction, with a warning.
    """
    if normalize not in NORMS:
        raise ValueError(f"normalize must be one of {NORMS}, got {normalize!r}")
    if x.numel() < 2:
        raise ValueError("a 2-D landscape needs an input with at least 2 elements (two orthogonal directions)")
    with torch.inference_mode(False), torch.enable_grad(), attack_mode(network), randomness_off(network):
        point = x.detach().clone().unsqueeze(0).requires_grad_(True)
        target = torch.as_tensor(y, device=x.device).detach().clone().reshape(1).long()
        loss = F.cross_entropy(network(point).float(), target)
        (grad,) = torch.autograd.grad(loss, point)
    g = grad.reshape(-1).double()
    if not torch.isfinite(g).all():
        raise FloatingPointError("the input gradient of the loss is not finite; cannot build the landscape axes")
    noise = torch.randn(2, x.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noise = noise.to(x.device)
    if not g.abs().amax() > 0:
        warnings.warn("loss landscape: the input gradient is exactly zero at this point; the first axis is a "
                      "random direction instead of the gradient direction", stacklevel=2)
        g = noise[1]
    u = g / g.norm()
    r = noise[0] - (noise[0] @ u) * u
    return tuple(_scaled(d, normalize).to(x.dtype).reshape(x.shape) for d in (g, r))


@torch.no_grad()
def loss_surface(network: nn.Module, x: Tensor, y: Tensor | int, d1: Tensor, d2: Tensor,
                 alphas: Sequence[float] | Tensor, betas: Sequence[float] | Tensor, draws: int = 1,
                 batch_size: int = 256, seed: int | None = None) -> Tensor:
    """``loss[i, j] = cross_entropy(network(x + alphas[i] * d1 + betas[j] * d2), y)``, float32, on x's device.

    ``x``, ``d1`` and ``d2`` have the shape of one example (no batch dimension). The grid is evaluated in
    batches of ``batch_size`` grid points, without gradients, with every submodule in eval mode (restored
    afterwards), and with the network as it is (wrap the call in ``randomness_at`` to choose theta).

    The inputs are deliberately *not* clamped to the valid input range: clamping would make the surface a
    non-linear function of the grid coordinates even for a linear model (flat wherever a pixel saturates)
    and so hide the geometry of the network's loss in the chosen plane, which is what the figure shows.

    ``draws`` > 1 averages the loss over that many forward passes of each grid point (a randomized network's
    single forward is one sample). With ``seed``, draw ``k`` re-seeds the RNG of x's device before every
    batch, so each draw is one fixed random network for the whole grid (common random numbers: the surface
    compares the same ``draws`` networks everywhere), the result is reproducible, and the caller's RNG state
    is restored afterwards.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if d1.shape != x.shape or d2.shape != x.shape:
        raise ValueError(f"directions must have the input's shape {tuple(x.shape)}, got {tuple(d1.shape)} "
                         f"and {tuple(d2.shape)}")
    alphas = torch.as_tensor(alphas, dtype=x.dtype, device=x.device).reshape(-1)
    betas = torch.as_tensor(betas, dtype=x.dtype, device=x.device).reshape(-1)
    n_a, n_b = len(alphas), len(betas)
    grid_a = alphas.repeat_interleave(n_b).view(-1, *([1] * x.dim()))  # row-major: point k = (k // B, k % B)
    grid_b = betas.repeat(n_a).view(-1, *([1] * x.dim()))
    target = torch.as_tensor(y, device=x.device).reshape(1).long()
    total = torch.zeros(n_a * n_b, dtype=torch.float64, device=x.device)
    with attack_mode(network):
        for k in range(draws):
            for start in range(0, n_a * n_b, batch_size):
                stop = min(start + batch_size, n_a * n_b)
                inputs = x + grid_a[start:stop] * d1 + grid_b[start:stop] * d2
                with _seeded(x.device, None if seed is None else stream_seed(seed, k)):
                    logits = network(inputs)
                loss = F.cross_entropy(logits.float(), target.expand(stop - start), reduction="none")
                total[start:stop] += loss.double()
    return (total / draws).view(n_a, n_b).float()


def plot_surface(alphas: Sequence[float], betas: Sequence[float], loss, title: str, levels: int = 20):
    """A matplotlib Figure (Agg canvas, no pyplot state) of ``loss[i, j]`` at (alphas[i], betas[j]): filled
    contours, contour lines, a colorbar and the centre point (clean or adversarial) marked at the origin."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    z = np.asarray(loss, dtype=np.float64).T  # contourf wants z[row = y (beta), column = x (alpha)]
    low, high = float(np.nanmin(z)), float(np.nanmax(z))
    bounds = np.linspace(low, high, levels + 1) if high > low else np.array([low - 0.5, low + 0.5])
    fig = Figure(figsize=(5.2, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    filled = ax.contourf(alphas, betas, z, levels=bounds, cmap="viridis")
    if high > low:
        ax.contour(alphas, betas, z, levels=bounds, colors="k", linewidths=0.4, alpha=0.6)
    ax.plot([0.0], [0.0], marker="+", color="red", markersize=10, mew=2)
    fig.colorbar(filled, ax=ax, label="cross-entropy loss")
    ax.set_xlabel(AXIS_LABELS[0])
    ax.set_ylabel(AXIS_LABELS[1])
    ax.set_title(title, fontsize=9 if "\n" in title else 10)  # two-line titles (adversarial centre)
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig
