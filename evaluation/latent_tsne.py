"""Latent t-SNE: the latent representation z of clean test points and of their adversarial examples, embedded
in two dimensions by t-SNE (the ADR supplementary's Figs. 3-4, Bui et al. 2020: "T-SNE visualization of
latent space", coloured by class and by the entropy of the prediction, adversarial examples marked).

Pure tensor / numpy code; ``advtrain.callbacks.LatentTSNE`` picks the points, crafts the attack and writes the files.
z comes from ``network.forward_with_latent(x) -> (z, logits)`` (the networks' uniform latent interface)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from advtrain.attacks import attack_mode, stream_seed

from .landscape import _seeded

__all__ = ["CLEAN", "ADVERSARIAL", "embed", "latents", "plot_embedding", "prediction_entropy", "select_points"]

CLEAN, ADVERSARIAL = "clean", "adversarial"
# our choice of markers: the supplementary draws its (failed) adversarial examples as black triangles
MARKERS = {"clean": ("o", "clean"), "succeeded": ("^", "adversarial, attack succeeded"),
           "failed": ("s", "adversarial, attack failed")}


def select_points(available: int, num_points: int, seed: int) -> list[int]:
    """``num_points`` distinct indices of a split of ``available`` examples, drawn by a CPU permutation seeded
    with ``seed`` (the same set on every machine and run), in increasing order; all of them if fewer."""
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:num_points].tolist())


@torch.no_grad()
def latents(network: nn.Module, x: Tensor, draws: int = 1, seed: int | None = None,
            batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(z, probabilities)`` of a batch: ``network.forward_with_latent`` in eval mode (BatchNorm statistics,
    no dropout; every submodule's own mode restored after), float32, without gradients.

    A randomized network (one forward pass is one sample) is averaged over ``draws`` forward passes: z is the
    mean latent and the probabilities the mean softmax (the expected prediction; our choice, the supplementary
    has no randomized model). With ``seed``, draw ``k`` is one seeded random network for the whole batch and
    the caller's RNG is left untouched (:func:`advtrain.evaluation.landscape._seeded`)."""
    if not hasattr(network, "forward_with_latent"):
        raise TypeError(f"{type(network).__name__} has no forward_with_latent(x) -> (z, logits); the latent t-SNE "
                        "needs a network of networks/ (or one implementing that method)")
    z_sum, p_sum = None, None
    with attack_mode(network):
        for k in range(draws):
            with _seeded(x.device, None if seed is None else stream_seed(seed, k)):
                parts = [network.forward_with_latent(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
            z = torch.cat([part[0].flatten(1).float() for part in parts])
            p = torch.cat([part[1].float().softmax(1) for part in parts])
            z_sum, p_sum = (z, p) if z_sum is None else (z_sum + z, p_sum + p)
    return z_sum / draws, p_sum / draws


def prediction_entropy(probabilities: Tensor) -> Tensor:
    """Shannon entropy (nats) of each row, with 0 log 0 = 0."""
    return -torch.special.xlogy(probabilities, probabilities).sum(1)


def embed(z: np.ndarray, seed: int, perplexity: float = 30.0) -> tuple[np.ndarray, float]:
    """Two-dimensional t-SNE (scikit-learn's Barnes-Hut, reproducible: ``random_state=seed``, PCA start, one
    thread) of the rows of ``z``; returns the coordinates and the perplexity used, which is capped at
    (n - 1) / 3 so that a small set of points keeps 3 perplexity neighbours (scikit-learn needs perplexity < n)."""
    from sklearn.manifold import TSNE

    z = np.asarray(z, dtype=np.float64)
    used = float(min(perplexity, max(1.0, (len(z) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=used, init="pca", learning_rate="auto", random_state=seed, n_jobs=1)
    return tsne.fit_transform(z), used


def _groups(kind: list[str], success: list[bool]) -> dict[str, np.ndarray]:
    """Point indices of each marker group: clean, adversarial that fooled the network, adversarial that did not."""
    kind, success = np.asarray(kind), np.asarray(success, dtype=bool)
    adversarial = kind == ADVERSARIAL
    return {"clean": np.flatnonzero(~adversarial), "succeeded": np.flatnonzero(adversarial & success),
            "failed": np.flatnonzero(adversarial & ~success)}


def plot_embedding(coords, labels, entropy, kind, success, title: str, num_classes: int | None = None):
    """A matplotlib Figure (Agg canvas, no pyplot state) with two panels of the same embedding: colour by the
    true class (left, the supplementary's Fig. 3) and by the entropy of the prediction (right, its Fig. 4).
    Markers: circles clean points, triangles adversarial examples that fooled the network, squares adversarial
    examples that did not (``success`` is read for adversarial points only); adversarial markers have a black
    edge. Each panel's scatter collections carry the group's legend label (tests read them back)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure

    coords, labels = np.asarray(coords, dtype=np.float64), np.asarray(labels)
    entropy = np.asarray(entropy, dtype=np.float64)
    classes = int(num_classes or labels.max() + 1)
    base = matplotlib.colormaps["tab10" if classes <= 10 else "tab20" if classes <= 20 else "viridis"]
    class_cmap = ListedColormap([base(i % base.N) for i in range(classes)] if classes <= 20 else
                                [base(i / max(classes - 1, 1)) for i in range(classes)])
    class_norm = BoundaryNorm(np.arange(classes + 1) - 0.5, classes)
    high = max(float(entropy.max()), 1e-6)
    fig = Figure(figsize=(12, 5.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = ((axes[0], labels, class_cmap, class_norm, "true class"),
              (axes[1], entropy, "viridis", None, "entropy of the prediction (nats)"))
    for ax, values, cmap, norm, what in panels:
        mappable = None
        for group, index in _groups(kind, success).items():
            marker, label = MARKERS[group]
            adversarial = group != "clean"
            mappable = ax.scatter(coords[index, 0], coords[index, 1], c=values[index], cmap=cmap, norm=norm,
                                  vmin=None if norm is not None else 0.0, vmax=None if norm is not None else high,
                                  marker=marker, s=26 if adversarial else 12, label=label,
                                  edgecolors="black" if adversarial else "none", linewidths=0.5)
        bar = fig.colorbar(mappable, ax=ax, label=what)
        if norm is not None:
            bar.set_ticks(range(classes))
        ax.set_title(f"coloured by {what}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        legend = ax.legend(loc="best", fontsize=8, framealpha=0.8)
        for handle in legend.legend_handles:  # grey legend markers: the colour means class / entropy, not group
            handle.set_array(None)
            handle.set_facecolor("lightgrey")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
