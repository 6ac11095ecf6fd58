"""What an attack reports besides accuracy: perturbation sizes of minimal-perturbation attacks.

Each metric is a per-example function of the clean and the adversarial batch, and a reduction over the
evaluated set. The attack table (``advtrain.attacks.registry``) names the metrics an attack reports; the evaluation
computes and reduces them without knowing which attack produced the examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


def l2_size(x: Tensor, x_adv: Tensor) -> Tensor:
    """||x_adv - x||_2 per example, (B,) float64."""
    return (x_adv.double() - x.double()).flatten(1).norm(dim=1)


def l2_ratio(x: Tensor, x_adv: Tensor) -> Tensor:
    """||x_adv - x||_2 / ||x||_2 per example (DeepFool's robustness, eq. 2 of Moosavi-Dezfooli et al. 2016, before
    the mean); 0 for an all-zero input left unchanged."""
    return l2_size(x, x_adv) / x.double().flatten(1).norm(dim=1).clamp_min(1e-12)


@dataclass(frozen=True)
class Metric:
    """A per-example quantity of an attack's output and how a set of examples is summarized."""

    per_example: Callable[[Tensor, Tensor], Tensor]
    reduce: str  # "mean" or "median"
    description: str

    def summarize(self, values: Tensor) -> float:
        if values.numel() == 0:
            return float("nan")
        if self.reduce == "mean":
            return float(values.double().mean())
        # the lower median for an even count (torch.median), so the value is one of the measured sizes
        return float(values.double().median())


METRICS = {
    "rho": Metric(l2_ratio, "mean", "DeepFool robustness: mean over examples of ||x_adv - x||_2 / ||x||_2"),
    "l2_median": Metric(l2_size, "median", "median over examples of ||x_adv - x||_2"),
}


def check_metric_name(name: str) -> str:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(sorted(METRICS))}")
    return name


__all__ = ["METRICS", "Metric", "check_metric_name", "l2_ratio", "l2_size"]
