"""What :class:`advtrain.callbacks.CovarianceTracker` reads from the data and writes to the loggers.

* :func:`input_shape_of` and :func:`data_mean_variance`: the input shape and the training data's mean per-pixel
  variance (the target of SGR's arXiv scaling), from the datamodule.
* :func:`log_covariance`: the paper's Fig. 2 in TensorBoard: the covariance functions against displacement
  (intra-channel solid, inter-channel dashed), their decay lengths as scalars ``covariance/decay_length_<c><c'>``,
  and for a full Sigma the matrix as an image; ``covariance/psd_change``, how far keeping Sigma positive
  semi-definite moved it (relative Frobenius norm). Off the hot path: it reads values back to the host.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from .sigma import Covariance, FullCovariance, decay_lengths

MAX_IMAGE_SIDE = 1024  # a full CIFAR Sigma (3072 x 3072) is average-pooled to this side for the image


def _train_set(datamodule):
    if datamodule is None or getattr(datamodule, "train_set", None) is None:
        raise ValueError("CovarianceTracker needs the training data (a datamodule with a train_set) to know the "
                         "input shape and, with scale 'data', the data's variance: run fit with a datamodule")
    return datamodule.train_set


def _batches(datamodule, limit: int, batch_size: int = 500):
    """Yield the first ``limit`` training inputs, preprocessed without augmentation, in batches. Iterating a
    DataLoader draws a seed from the global RNG: callers run this under ``torch.random.fork_rng``, so adding the
    tracker changes nothing in training."""
    dataset = _train_set(datamodule)
    n = min(len(dataset), limit)
    # in-memory datasets hand out whole batches (__getitems__); file datasets go through default collate
    collate = (lambda batch: batch) if hasattr(dataset, "__getitems__") else None
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False, collate_fn=collate)
    for batch in loader:
        x, _ = datamodule.preprocess(batch, train=False) if hasattr(datamodule, "preprocess") else batch
        yield x


def input_shape_of(datamodule) -> tuple[int, ...]:
    """One input's shape: the datamodule's ``input_shape`` when it has one, else that of its first training
    example after preprocessing."""
    shape = getattr(datamodule, "input_shape", None)
    if shape:
        return tuple(int(n) for n in shape)
    with torch.random.fork_rng(devices=[]):
        return tuple(next(iter(_batches(datamodule, 1))).shape[1:])


def data_mean_variance(datamodule, limit: int) -> float:
    """The mean over coordinates of the per-coordinate variance (divided by n - 1) of the first ``limit``
    training inputs, preprocessed without augmentation, accumulated in float64: the mean diagonal of the data
    set's covariance (what ``advtrain covariance`` writes), without building the d x d matrix."""
    total = squares = None
    n = 0
    with torch.random.fork_rng(devices=[]):
        for x in _batches(datamodule, limit):
            flat = x.flatten(1).double()
            total = flat.sum(0) if total is None else total + flat.sum(0)
            squares = (flat * flat).sum(0) if squares is None else squares + (flat * flat).sum(0)
            n += flat.shape[0]
    if n < 2:
        raise ValueError(f"CovarianceTracker scale 'data' needs at least 2 training examples, got {n}")
    variance = (squares - total * total / n) / (n - 1)
    return float(variance.mean())


def plot_functions(functions: Tensor, title: str = "covariance functions"):
    """A matplotlib Figure (Agg canvas, no pyplot state) of CovFun_{c,c'}(r) against displacement r: one line
    per channel pair c <= c', intra-channel solid, inter-channel dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = functions.detach().double().cpu()
    channels, _, bins = values.shape
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for c in range(channels):
        for d in range(c, channels):
            ax.plot(range(bins), values[c, d].numpy(), linestyle="-" if c == d else "--", label=f"{c}{d}")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("displacement r (pixels)")
    ax.set_ylabel("covariance")
    ax.set_title(title)
    if channels > 1:
        ax.legend(title="channels", fontsize="small")
    fig.tight_layout()
    return fig


def matrix_image(matrix: Tensor) -> Tensor:
    """(1, h, w) image in [0, 1] of a (d, d) matrix, average-pooled to at most MAX_IMAGE_SIDE per side."""
    m = matrix.detach().float().cpu()[None, None]
    if m.shape[-1] > MAX_IMAGE_SIDE:
        m = F.adaptive_avg_pool2d(m, MAX_IMAGE_SIDE)
    m = m[0]
    low, high = m.min(), m.max()
    return (m - low) / (high - low).clamp_min(1e-30)


def log_covariance(trainer, sigma: Covariance, step: int) -> dict[str, float]:
    """Write Sigma's decay lengths (every logger) and, to each TensorBoardLogger, its covariance functions as a
    plot and, for a full Sigma, the matrix as an image. Returns the scalars written."""
    scalars = {"covariance/mean_diagonal": float(sigma.mean_diagonal()),
               "covariance/psd_change": float(sigma.psd_change())}
    try:
        functions = sigma.covariance_functions()
    except ValueError:  # a full Sigma over inputs that are neither images nor signals: no functions
        functions = None
    if functions is not None:
        lengths = decay_lengths(functions)
        channels = lengths.shape[0]
        for c in range(channels):
            for d in range(c, channels):
                scalars[f"covariance/decay_length_{c}{d}"] = float(lengths[c, d])
    for logger in trainer.loggers:
        logger.log_metrics({k: v for k, v in scalars.items() if math.isfinite(v)}, step=step)
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment
            if functions is not None:
                writer.add_figure("covariance/functions", plot_functions(functions), global_step=step, close=True)
            if isinstance(sigma, FullCovariance):
                writer.add_image("covariance/matrix", matrix_image(sigma.matrix), global_step=step)
    return scalars


__all__ = ["data_mean_variance", "input_shape_of", "log_covariance", "matrix_image", "plot_functions"]
