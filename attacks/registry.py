"""Attacks by name, and one attack setting (attack x budget x steps x restarts) as data.

``AttackSetting`` is what configs write; it checks itself when built, so a typo or an impossible
budget fails when the config is read, not hours into a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from .autoattack import (
    AUTOATTACK_VERSION,
    EOT_DRAWS,
    ITERATIONS,
    RHO,
    SQUARE_P_INIT,
    SQUARE_QUERIES,
    STAGES,
    TARGET_CLASSES,
    VERSIONS,
    autoattack,
)
from .budget import check_steps, format_budget, parse_budget
from .core import NORMS
from .gama import gama_fw, gama_pgd
from .standard import bim, bim_steps, fgsm, fgsm_rs, mim, pgd

# name -> (function, takes steps, has a random start)
ATTACKS = {
    "fgsm": (fgsm, False, False),
    "fgsm_rs": (fgsm_rs, False, True),
    "bim": (bim, True, False),
    "pgd": (pgd, True, True),
    "mim": (mim, True, False),
    "gama_pgd": (gama_pgd, True, True),
    "gama_fw": (gama_fw, True, True),
    "autoattack": (autoattack, False, False),
}
DEFAULT_STEPS = {"gama_pgd": 100, "gama_fw": 100}
EOT_ATTACKS = ("fgsm", "fgsm_rs", "bim", "pgd", "mim")
# The backward of sign() an attack may use on a binary (XNOR) network (defensive tensorization, Table 4);
# networks.binary implements them.
SIGN_SURROGATES = ("ste", "tanh", "tanh0.75")
KURAKIN = "kurakin"  # steps: floor(min(eps + 4, 1.25 eps)) iterations, eps in 1/255 units (Kurakin et al. 2017)


def check_attack_name(name: str) -> str:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of: {', '.join(sorted(ATTACKS))}")
    return name


@dataclass
class AttackSetting:
    """One attack configuration.

    Args:
        attack: one of ``fgsm``, ``fgsm_rs``, ``bim``, ``pgd``, ``mim``, ``gama_pgd``, ``gama_fw``.
        eps: the budget in the input's natural range, e.g. ``8/255`` or ``0.3``; a list expands into
            one setting per budget (:meth:`expand`).
        steps: iterations (None: the attack's default: bim Kurakin's count, pgd/mim 10, gama 100), or
            ``kurakin`` for Kurakin's count floor(min(eps + 4, 1.25 eps)) (eps in 1/255) with any attack.
        step: step size (None: pgd 2.5 eps / steps, mim eps / steps, bim 1/255, gama_pgd 2 eps, i.e. 16/255
            at 8/255, divided by 10 at iterations 60 and 85; for gama_fw the Frank-Wolfe gamma, 0.5).
        restarts: random restarts, keeping each example's worst case (needs a random start).
        norm: ``linf`` or ``l2`` (l2 for pgd and autoattack only).
        version: autoattack only: ``standard`` or ``rand``; None chooses ``rand`` for a randomized model
            (the evaluation detects it) and ``standard`` otherwise.
        eot: expectation over transformation for randomized models: each gradient is the mean over this
            many forward passes (fgsm, fgsm_rs, bim, pgd, mim; AutoAttack ``rand`` has its own, 20).
        omniscient: craft the examples on the network with its randomness off (Tucker theta = 1, the full
            weights), then test them on the randomized network (defensive tensorization, Table 3). The
            evaluation applies it (``networks.randomness_off``).
        surrogate: for binary (XNOR) networks, the backward of sign() the attack uses: ``ste`` (identity
            clipped to [-1, 1], as in training), ``tanh`` or ``tanh0.75`` (Table 4). Applied by the evaluation.
    """

    attack: str = "pgd"
    eps: float | str | list[float | str] = "8/255"
    steps: int | str | None = None
    step: float | str | None = None
    restarts: int = 1
    norm: str = "linf"
    version: str | None = None
    eot: int = 1
    omniscient: bool = False
    surrogate: str | None = None
    _eps_list: list[float] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        check_attack_name(self.attack)
        if self.attack == "autoattack" and (self.steps is not None or self.step is not None):
            raise ValueError("autoattack runs its official settings; steps and step cannot be set")
        budgets = self.eps if isinstance(self.eps, (list, tuple)) else [self.eps]
        if not budgets:
            raise ValueError(f"{self.attack}: eps is an empty list")
        self._eps_list = [parse_budget(e, f"{self.attack} eps") for e in budgets]
        if self.step is not None:
            self.step = parse_budget(self.step, f"{self.attack} step")
        _, takes_steps, random = ATTACKS[self.attack]
        if self.steps == KURAKIN and self.attack in ("bim", "pgd", "mim"):
            pass
        elif isinstance(self.steps, str):
            raise ValueError(f"{self.attack} steps: an integer, or '{KURAKIN}' for bim/pgd/mim, got {self.steps!r}")
        elif self.steps is not None:
            check_steps(self.steps, f"{self.attack} steps")
            if not takes_steps and self.steps != 1:
                raise ValueError(f"{self.attack} is single-step (steps must be 1 or unset); use bim or "
                                 "pgd for more steps")
        check_steps(self.restarts, f"{self.attack} restarts")
        if self.restarts > 1 and not random:
            raise ValueError(f"{self.attack} has no random start, so restarts={self.restarts} would "
                             "repeat the same attack; use pgd for restarts")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if self.norm != "linf" and self.attack not in ("pgd", "autoattack"):
            raise ValueError(f"norm {self.norm!r} is supported by pgd and autoattack only, not {self.attack}")
        check_steps(self.eot, f"{self.attack} eot")
        if self.eot > 1 and self.attack not in EOT_ATTACKS:
            raise ValueError(f"eot is supported by {', '.join(EOT_ATTACKS)}; {self.attack} has none (autoattack: "
                             "use version 'rand', which averages 20 draws)")
        if self.surrogate is not None and self.surrogate not in SIGN_SURROGATES:
            raise ValueError(f"unknown surrogate {self.surrogate!r}; choose one of {', '.join(SIGN_SURROGATES)}")
        if self.version is not None and (self.attack != "autoattack" or self.version not in VERSIONS):
            raise ValueError(f"version {self.version!r}: only autoattack has versions ({', '.join(VERSIONS)})")

    def expand(self) -> list[AttackSetting]:
        """One setting per budget."""
        return [replace(self, eps=e) for e in self._eps_list]

    @property
    def budget(self) -> float:
        if len(self._eps_list) != 1:
            raise ValueError("this setting has several budgets; call expand() first")
        return self._eps_list[0]

    @property
    def resolved_steps(self) -> int:
        if self.steps == KURAKIN:
            return bim_steps(self.budget)
        if self.steps is not None:
            return self.steps
        if self.attack == "bim":
            return bim_steps(self.budget)
        if self.attack == "autoattack":
            return ITERATIONS
        return DEFAULT_STEPS.get(self.attack, 10) if ATTACKS[self.attack][1] else 1

    @property
    def resolved_step(self) -> float:
        if self.step is not None:
            return float(self.step)
        eps, steps = self.budget, self.resolved_steps
        return {"fgsm": eps, "fgsm_rs": 1.25 * eps, "bim": 1 / 255, "pgd": 2.5 * eps / steps,
                "mim": eps / steps, "gama_pgd": 2 * eps, "gama_fw": 0.5, "autoattack": 0.0}[self.attack]

    @property
    def name(self) -> str:
        """A short label such as ``pgd-20x5 linf eps=8/255``."""
        label = self.attack if self.version is None else f"{self.attack}-{self.version}"
        if ATTACKS[self.attack][1]:
            label += f"-{self.resolved_steps}"
        if self.restarts > 1:
            label += f"x{self.restarts}"
        if self.norm != "linf":
            label += f" {self.norm}"
        if self.eot > 1:
            label += f" eot{self.eot}"
        if self.omniscient:
            label += " omniscient"
        if self.surrogate is not None:
            label += f" sign'={self.surrogate}"
        return f"{label} eps={format_budget(self.budget)}"

    def as_dict(self) -> dict:
        entry = {"attack": self.attack, "eps": self.budget, "eps_label": format_budget(self.budget),
                 "norm": self.norm, "steps": self.resolved_steps, "step": self.resolved_step,
                 "restarts": self.restarts, "steps_rule": KURAKIN if self.steps == KURAKIN else None,
                 "eot_samples": self.eot, "omniscient": self.omniscient,
                 "surrogate": self.surrogate}
        if self.attack == "autoattack":
            version = self.version or "standard"
            entry.update(steps=ITERATIONS, step=None, version=version, implementation=AUTOATTACK_VERSION,
                         stages=list(STAGES[version]),
                         settings={"iterations": ITERATIONS, "target_classes": TARGET_CLASSES,
                                   "square_queries": SQUARE_QUERIES, "square_p_init": SQUARE_P_INIT,
                                   "apgd_rho": RHO, "eot_draws": EOT_DRAWS if version == "rand" else 1})
            entry["eot_samples"] = EOT_DRAWS if version == "rand" else 1
        return entry

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
            bounds: tuple[float, float] = (0.0, 1.0)) -> Tensor:
        """Generate adversarial examples for one batch (the caller sets the model's mode)."""
        eps, step = self.budget, self.resolved_step
        common = dict(bounds=bounds, generator=generator)
        if self.attack in EOT_ATTACKS:
            common["eot"] = self.eot
        if self.attack == "fgsm":
            return fgsm(model, x, y, eps, **common)
        if self.attack == "fgsm_rs":
            return fgsm_rs(model, x, y, eps, step=step, **common)
        if self.attack == "bim":
            return bim(model, x, y, eps, step=step, steps=self.resolved_steps, **common)
        if self.attack == "mim":
            return mim(model, x, y, eps, step=step, steps=self.resolved_steps, **common)
        if self.attack == "autoattack":
            if tuple(bounds) != (0.0, 1.0):
                raise ValueError(f"autoattack (torchattacks' components) clamps inputs to [0, 1]; this data lives "
                                 f"in {list(bounds)}. Use pgd/gama_pgd for it.")
            with torch.no_grad():
                n_classes = model(x[:1]).shape[1]
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=x.device)) if generator else 0
            return autoattack(model, x, y, eps, norm=self.norm, version=self.version or "standard",
                                 n_classes=n_classes, seed=seed)
        if self.attack == "gama_pgd":
            return gama_pgd(model, x, y, eps, step=step, steps=self.resolved_steps, restarts=self.restarts, **common)
        if self.attack == "gama_fw":
            return gama_fw(model, x, y, eps, gamma=step, steps=self.resolved_steps, restarts=self.restarts, **common)
        return pgd(model, x, y, eps, step=step, steps=self.resolved_steps, norm=self.norm,
                   restarts=self.restarts, **common)
