"""Driving torchattacks 3.5.1's APGD, APGDT, FAB and Square for :mod:`advtrain.attacks.autoattack`: the components
of each version with the official settings, APGD on every point of a randomized model, the state that
torchattacks changes and that is restored, and the checks the protocol runs with them."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VERSIONS = ("standard", "rand")
ITERATIONS = 100  # APGD, APGD-T, FAB-T (official n_iter)
TARGET_CLASSES = 9  # APGD-T and FAB-T (official n_target_classes)
SQUARE_QUERIES = 5000
SQUARE_P_INIT = 0.8
RHO = 0.75  # APGD step-size decrease threshold
FAB_ALPHA_MAX, FAB_ETA, FAB_BETA = 0.1, 1.05, 0.9
EOT_DRAWS = 20  # rand: gradients averaged over 20 draws

_NORMS = {"linf": "Linf", "l2": "L2"}


def build_stages(model: nn.Module, eps: float, *, norm: str = "Linf", version: str = "standard",
                 n_classes: int = 10, seed: int = 0,
                 eot_draws: int = EOT_DRAWS) -> list[tuple[str, object, dict]]:
    """The torchattacks objects of one AutoAttack version: ``[(name, attack, settings), ...]``.

    ``settings`` holds every constructor argument except the model, plus the number of target
    classes read back from the built object. torchattacks derives the number of targets as
    ``n_classes - 1``, so ``n_classes = targets + 1`` is what it is given to get
    ``min(9, n_classes - 1)`` targets.
    """
    import torchattacks

    norm = _check_norm(norm)
    common = {"norm": norm, "eps": float(eps), "seed": seed, "verbose": False}
    apgd = {**common, "steps": ITERATIONS, "n_restarts": 1, "rho": RHO}
    if version == "rand":
        specs = [("apgd-ce", torchattacks.APGD, {**apgd, "loss": "ce", "eot_iter": eot_draws}),
                 ("apgd-dlr", torchattacks.APGD, {**apgd, "loss": "dlr", "eot_iter": eot_draws})]
    elif version == "standard":
        targets = min(TARGET_CLASSES, n_classes - 1)
        specs = [
            ("apgd-ce", torchattacks.APGD, {**apgd, "loss": "ce", "eot_iter": 1}),
            ("apgd-t", torchattacks.APGDT, {**apgd, "eot_iter": 1, "n_classes": targets + 1}),
            ("fab-t", torchattacks.FAB, {**common, "steps": ITERATIONS, "n_restarts": 1, "alpha_max": FAB_ALPHA_MAX,
                                         "eta": FAB_ETA, "beta": FAB_BETA, "multi_targeted": True,
                                         "n_classes": targets + 1}),
            ("square", _square_within_image(torchattacks.Square),
             {**common, "n_queries": SQUARE_QUERIES, "n_restarts": 1, "p_init": SQUARE_P_INIT, "loss": "margin",
              "resc_schedule": False}),
        ]
    else:
        raise ValueError(f"unknown AutoAttack version {version!r}; choose one of {', '.join(VERSIONS)}")
    stages = []
    for name, cls, settings in specs:
        attack = cls(model, **settings)
        settings = dict(settings)
        if hasattr(attack, "n_target_classes") and "n_classes" in settings:
            if attack.n_target_classes != settings["n_classes"] - 1:
                raise RuntimeError(f"torchattacks {cls.__name__} built {attack.n_target_classes} target classes, "
                                   f"expected {settings['n_classes'] - 1}; its API has changed")
            settings["n_target_classes"] = attack.n_target_classes
        stages.append((name, attack, settings))
    return stages


def _square_within_image(square: type) -> type:
    """torchattacks' Square (the class given, so a test's spy on it still sees the calls) with its window capped
    at the image's short side. Square's window has side round(sqrt(p H W)) (L2: at least 3, made odd), up to 0.89
    sqrt(H W) at the first query, longer than the short side of a strongly non-square image, where the official
    code crashes and torchattacks places windows at negative offsets. Capping p at side^2 / (H W) keeps it inside;
    square images (p_max >= 1 > p_init) run exactly as before."""

    class Square(square):
        def forward(self, images, labels):
            h, w = images.shape[-2:]
            side = min(h, w)
            if self.norm == "L2" and side % 2 == 0:  # L2 windows are made odd: side + 1 would not fit
                side -= 1
            self.p_max = side**2 / (h * w)
            return super().forward(images, labels)

        def p_selection(self, it):
            return min(super().p_selection(it), getattr(self, "p_max", 1.0))

    Square.__name__ = Square.__qualname__ = square.__name__
    return Square


def _apgd_every_point(attack, x: Tensor, y: Tensor, model: nn.Module, draws: int) -> tuple[Tensor, Tensor]:
    """One APGD run (n_restarts = 1) on every given point of a randomized model.

    ``APGD.perturb`` would first drop the points that one clean forward pass misclassifies, and return
    the clean input for every point that no single draw misclassified during the run. Here the run
    is seeded as ``perturb`` seeds it, ``attack_single_run`` sees all points, and each point keeps
    whichever of its two outputs (the highest-loss iterate, and the last iterate that some draw
    misclassified) fewer of ``draws`` forward passes classify correctly. Returns that point and its
    fraction of correct draws."""
    _seed_rngs(attack.seed, x.device)
    x_best, _, _, x_fooled = attack.attack_single_run(x, y)
    x_best, x_fooled = x_best.detach().to(x.dtype), x_fooled.detach().to(x.dtype)
    frac_best = _correct_fraction(model, x_best, y, draws)
    frac_fooled = _correct_fraction(model, x_fooled, y, draws)
    take = frac_fooled < frac_best
    out = torch.where(take.view(-1, *([1] * (x.dim() - 1))), x_fooled, x_best)
    return out, torch.where(take, frac_fooled, frac_best)


class _Reshaped(nn.Module):
    """Presents a model on non-image inputs to torchattacks as one on (N, 1, 1, D) images."""

    def __init__(self, model: nn.Module, sample_shape: torch.Size):
        super().__init__()
        self.model = model
        self.sample_shape = tuple(sample_shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.reshape(x.shape[0], *self.sample_shape))


class _ContiguousGradient(torch.autograd.Function):
    """The identity; its backward hands the input gradient on in the default memory format."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


class _DefaultFormat(nn.Module):
    """Presents a model to torchattacks with inputs and input gradients in the default memory format: a
    channels_last network (``configs/trainer/gpu.yaml``) gives channels_last input gradients, and torchattacks'
    FAB ``.view``s them, which fails on 3-channel images."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(_ContiguousGradient.apply(x))


def _seed_rngs(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and that of ``device`` (not every GPU, as ``torch.manual_seed`` would)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _check_norm(norm: str) -> str:
    key = norm.lower() if isinstance(norm, str) else None
    if key not in _NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose 'Linf' or 'L2'")
    return _NORMS[key]


def _zero_gradient_points(stage: str, attack, model: nn.Module, x: Tensor, y: Tensor, draws: int) -> int:
    """The official ``checks.check_zero_gradients`` count for a DLR stage: points whose input gradient of the
    stage's own torchattacks loss, averaged over ``draws`` passes (its ``eot_iter``), is exactly zero. APGD-T's
    loss is targeted at its first target, the most likely other class; the official check looks at the random
    start, this one at the clean input (the start is drawn inside torchattacks)."""
    x = x.detach().clone().requires_grad_(True)
    gradient = torch.zeros_like(x)
    for _ in range(draws):
        logits = model(x)
        if stage == "apgd-t":
            loss = attack.dlr_loss_targeted(logits, y, logits.sort(dim=1)[1][:, -2])
        else:
            loss = attack.dlr_loss(logits, y)
        gradient += torch.autograd.grad(loss.sum(), x)[0]
    return int((gradient.flatten(1).abs().sum(1) == 0).sum())


def _correct_fraction(model: nn.Module, x: Tensor, y: Tensor, draws: int) -> Tensor:
    """Per example, the fraction of ``draws`` forward passes that classify it correctly."""
    with torch.no_grad():
        hits = sum((model(x).argmax(1) == y).double() for _ in range(draws))
    return hits / draws


def _warn_if_randomized(model: nn.Module, x: Tensor, logits: Tensor) -> None:
    """The official ``checks.check_randomized`` rule, with two passes: predictions or L2-normalized
    logits that differ by more than 1e-4 mean the model is random and 'standard' is the wrong version."""
    with torch.no_grad():
        again = model(x)
    diff = (F.normalize(logits.float(), dim=1) - F.normalize(again.float(), dim=1)).norm(dim=1).max()
    if not torch.equal(logits.argmax(1), again.argmax(1)) or float(diff) > 1e-4:
        warnings.warn("two forward passes of the same inputs differ: the model looks randomized, and "
                      "AutoAttack 'standard' judges each point by one pass; use version='rand'",
                      RuntimeWarning, stacklevel=3)


@contextmanager
def _kept_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Restore afterwards what torchattacks changes: the global RNGs (it reseeds them), every
    parameter's ``.grad`` (FAB calls ``backward()``) and every submodule's train/eval flag."""
    devices = []
    if device.type == "cuda":
        devices = sorted({device.index if device.index is not None else torch.cuda.current_device(),
                          torch.cuda.current_device()})
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = [torch.cuda.current_device()]
    modes = [(module, module.training) for module in model.modules()]
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for module, training in modes:
            module.training = training
        for p, grad in grads:
            p.grad = grad


def _torchattacks_version() -> str:
    import torchattacks

    return str(getattr(torchattacks, "__version__", "unknown"))
