"""The attack table: every attack the package runs, in evaluation and in training, as one row each.

A row names the attack's function and says what it takes: a budget (eps) or none (DeepFool finds the smallest
perturbation), iterations and a step size (with their defaults), restarts, EOT, the norms it supports, its own
parameters with their defaults, and the metrics it reports besides accuracy. ``advtrain.attacks.setting.AttackSetting``
reads a config entry against its row (a wrong parameter fails when the config is read, naming the attack and
what it takes) and calls the function with exactly the keywords the row declares. Adding an attack is one
function in this package and one row here; neither the evaluation nor a defense changes. A row marked ``trains``
can be a defense's training attack (``attack: {attack: pgd, steps: 10}`` in a config, as in an evaluation suite);
its ``context`` names what the defense hands it per batch (TRADES: the clean logits; NuAT: also lambda), and such a
row runs in training only.

Every function is called as ``fn(model, x, y, [eps,] *, bounds=..., generator=..., <declared keywords>)`` and
returns ``x_adv``; the caller sets the model's mode (:func:`advtrain.attacks.mode.attack_mode`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from .budget import parse_budget
from .deepfool import deepfool
from .gama import gama_fw, gama_pgd
from .noise import lrc, uniform_noise
from .nuclear import nuclear_norm_step, nuclear_two_step
from .standard import (
    BIM_STEP,
    bim,
    bim_steps,
    fgsm,
    fgsm_rs,
    fgsm_rs_step,
    mim,
    mim_step,
    pgd,
    pgd_step,
    rfgsm,
    trades_kl,
)
from .targeted import bim_targeted, mim_targeted, pgd_targeted

KINDS = ("single_step", "iterative", "targeted", "noise", "minimal")


@dataclass(frozen=True)
class Param:
    """An attack's own parameter: its default and what values it accepts.

    kind: ``int``, ``float``, ``str``, ``budget`` (a number or a fraction such as "4/255") or ``path`` (a file
    that must exist). ``minimum`` bounds numbers from below; ``choices`` lists the accepted strings.
    """

    default: Any
    kind: str = "float"
    minimum: float | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""

    def check(self, attack: str, name: str, value: Any) -> Any:
        where = f"{attack} {name}"
        if value is None and self.default is None:
            return None
        if self.kind == "budget":
            return parse_budget(value, where)
        if self.kind == "path":
            if not isinstance(value, str) or not Path(value).is_file():
                raise ValueError(f"{where}: no such file {value!r}")
            return value
        if self.kind == "str":
            if not isinstance(value, str) or (self.choices is not None and value not in self.choices):
                raise ValueError(f"{where} must be one of {', '.join(self.choices or ())}, got {value!r}")
            return value
        number_ok = isinstance(value, int) if self.kind == "int" else isinstance(value, (int, float))
        if isinstance(value, bool) or not number_ok or (self.minimum is not None and value < self.minimum):
            floor = f" >= {self.minimum:g}" if self.minimum is not None else ""
            raise ValueError(f"{where} must be {'an integer' if self.kind == 'int' else 'a number'}{floor}, "
                             f"got {value!r}")
        return value


@dataclass(frozen=True)
class AttackSpec:
    """One row of the table.

    Args:
        function: the attack.
        kind: ``single_step``, ``iterative`` (untargeted), ``targeted``, ``noise`` (no gradient) or ``minimal``
            (minimal perturbation, no budget); the sanity checks compare iterative with single-step attacks.
        budget: takes ``eps``.
        steps: default iterations (an int, or a function of eps); None for single-step attacks (recorded as 1).
        step: default step size as a function of (eps, steps, params); None when the attack has no step size.
        tunable: which of ``steps`` and ``step`` a config may set (and the function receives).
        restarts: has a random start, so restarts (worst case per example) make sense.
        eot: takes ``eot`` (gradients averaged over draws of a randomized model).
        norms: supported norms, the default first; ``norm`` is passed when there is a choice.
        variants: named versions (``version``), the default first (AutoAttack: standard, rand).
        params: the attack's own parameters.
        label_params: parameters always shown in the setting's name (others only when not at their default).
        metrics: reported besides accuracy (:data:`advtrain.attacks.metrics.METRICS`).
        keywords: the function's name for a setting field when it differs (GAMA-FW calls its step ``gamma``).
        fixed: why ``steps``/``step`` cannot be set, for the error message.
        records: extra fields for the results file.
        trains: a defense may craft its training examples with it.
        context: keywords the defense that runs it provides per batch (a row with context runs in training only).
    """

    function: Callable[..., Tensor]
    kind: str
    budget: bool = True
    steps: int | Callable[[float], int] | None = None
    step: Callable[[float, int, dict], float] | None = None
    tunable: tuple[str, ...] = ("steps", "step")
    restarts: bool = False
    eot: bool = False
    norms: tuple[str, ...] = ("linf",)
    variants: tuple[str, ...] = ()
    params: dict[str, Param] = field(default_factory=dict)
    label_params: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    keywords: dict[str, str] = field(default_factory=dict)
    fixed: str = ""
    records: Callable[[Any], dict] | None = None
    trains: bool = False
    context: tuple[str, ...] = ()


def _autoattack_in_suite(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, norm: str = "linf",
                         version: str = "standard", bounds: tuple[float, float] = (0.0, 1.0),
                         generator: torch.Generator | None = None) -> Tensor:
    """:func:`advtrain.attacks.autoattack.autoattack` as the table calls attacks: the number of classes from one forward
    pass, the seed drawn from ``generator`` (0 without one), [0, 1] inputs only."""
    if tuple(bounds) != (0.0, 1.0):
        raise ValueError(f"autoattack (torchattacks' components) clamps inputs to [0, 1]; this data lives "
                         f"in {list(bounds)}. Use pgd/gama_pgd for it.")
    with torch.no_grad():
        n_classes = model(x[:1]).shape[1]
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=x.device)) if generator else 0
    return autoattack(model, x, y, eps, norm=norm, version=version, n_classes=n_classes, seed=seed)


def _autoattack_records(setting) -> dict:
    version = setting.version or VERSIONS[0]
    return {"steps": ITERATIONS, "step": None, "version": version, "implementation": AUTOATTACK_VERSION,
            "stages": list(STAGES[version]),
            "settings": {"iterations": ITERATIONS, "target_classes": TARGET_CLASSES,
                         "square_queries": SQUARE_QUERIES, "square_p_init": SQUARE_P_INIT, "apgd_rho": RHO,
                         "eot_draws": EOT_DRAWS if version == "rand" else 1},
            "eot_samples": EOT_DRAWS if version == "rand" else 1}


def _pgd_step(eps: float, steps: int, params: dict) -> float:
    return pgd_step(eps, steps)


def _mim_step(eps: float, steps: int, params: dict) -> float:
    return mim_step(eps, steps)


def _bim_step(eps: float, steps: int, params: dict) -> float:
    return BIM_STEP


_START_SCALE = Param("4/255", "budget", help="a of NuAT's Bernoulli start +-a (4/255 CIFAR, 0.3 MNIST)")
_NUCLEAR = ("clean_logits", "lam", "use_nuclear")
_TARGET = Param("random", "str", choices=("random", "all"), help="random: one class != y; all: every class != y")

ATTACKS: dict[str, AttackSpec] = {
    "fgsm": AttackSpec(fgsm, "single_step", step=lambda eps, steps, p: eps, tunable=(), eot=True, trains=True),
    "fgsm_rs": AttackSpec(fgsm_rs, "single_step", step=lambda eps, steps, p: fgsm_rs_step(eps), tunable=("step",),
                          eot=True, trains=True),
    "rfgsm": AttackSpec(rfgsm, "single_step", tunable=(), eot=True, trains=True,
                        step=lambda eps, steps, p: eps - (eps / 2 if p["alpha"] is None else p["alpha"]),
                        params={"alpha": Param(None, "budget", help="random step; default eps / 2")}),
    "bim": AttackSpec(bim, "iterative", steps=bim_steps, step=_bim_step, eot=True, trains=True),
    "pgd": AttackSpec(pgd, "iterative", steps=10, step=_pgd_step, restarts=True, eot=True, norms=("linf", "l2"),
                      trains=True),
    "pgd_targeted": AttackSpec(pgd_targeted, "targeted", steps=10, step=_pgd_step, restarts=True, eot=True,
                               norms=("linf", "l2"), label_params=("target",),
                               params={"target": Param("random", "str", choices=("random", "all"),
                                                       help="random: one class != y; all: every class != y")}),
    "mim": AttackSpec(mim, "iterative", steps=10, step=_mim_step, eot=True, trains=True),
    # ADR supplementary Tables 3-4: BIM and MIM toward a random class or every class (no random start, no restarts)
    "bim_targeted": AttackSpec(bim_targeted, "targeted", steps=bim_steps, step=_bim_step, eot=True,
                               label_params=("target",), params={"target": _TARGET}),
    "mim_targeted": AttackSpec(mim_targeted, "targeted", steps=10, step=_mim_step, eot=True,
                               label_params=("target",), params={"target": _TARGET}),
    "gama_pgd": AttackSpec(gama_pgd, "iterative", steps=100, step=lambda eps, steps, p: 2 * eps, restarts=True),
    "gama_fw": AttackSpec(gama_fw, "iterative", steps=100, step=lambda eps, steps, p: 0.5, restarts=True,
                          keywords={"step": "gamma"}),
    "autoattack": AttackSpec(_autoattack_in_suite, "iterative", steps=ITERATIONS, tunable=(),
                             norms=("linf", "l2"), variants=VERSIONS, fixed="autoattack runs its official settings",
                             records=_autoattack_records),
    "deepfool": AttackSpec(deepfool, "minimal", budget=False, steps=50, tunable=("steps",), norms=("l2",),
                           metrics=("rho", "l2_median"),
                           params={"overshoot": Param(0.02, minimum=0.0),
                                   "candidates": Param(10, "int", minimum=2, help="top classes tried"),
                                   "linearize": Param("clipped", "str", choices=("clipped", "overshoot"),
                                                      help="clipped: CleverHans; overshoot: the LTS4 code")}),
    "uniform_noise": AttackSpec(uniform_noise, "noise", tunable=(),
                                params={"samples": Param(1, "int", minimum=1, help="worst of this many draws")}),
    "lrc": AttackSpec(lrc, "noise", tunable=(), label_params=("zeta",),
                      params={"zeta": Param(4.0, minimum=1e-6, help="decay length of K, in pixels"),
                              "samples": Param(100, "int", minimum=1, help="worst of this many draws"),
                              "channel_correlation": Param(0.5, minimum=-1.0),
                              "covariance": Param(None, "path", help="a (d, d) covariance file instead of C x K")}),
    # training attacks that need what only their defense has (see `context`)
    "trades_kl": AttackSpec(trades_kl, "iterative", steps=10, step=lambda eps, steps, p: 2 / 255, eot=True,
                            trains=True, context=("clean_logits",)),
    "nuclear": AttackSpec(nuclear_norm_step, "single_step", tunable=(), step=lambda eps, steps, p: eps, trains=True,
                          params={"start_scale": _START_SCALE}, context=_NUCLEAR,
                          fixed="NuAT's attack is one signed step of eps from a Bernoulli start"),
    "nuclear_two_step": AttackSpec(nuclear_two_step, "iterative", steps=2, tunable=(),
                                   step=lambda eps, steps, p: eps, trains=True, params={"start_scale": _START_SCALE},
                                   context=(*_NUCLEAR, "first_model", "first_clean_logits"),
                                   fixed="NuAT2's attack is two signed steps of eps from a Bernoulli start"),
}

KURAKIN = "kurakin"  # steps: floor(min(eps + 4, 1.25 eps)) iterations, eps in 1/255 units (Kurakin et al. 2017)


def plural(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def check_attack_name(name: str) -> str:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of: {', '.join(sorted(ATTACKS))}")
    return name


def attacks_with(predicate: Callable[[AttackSpec], bool]) -> list[str]:
    """Names of the attacks whose row satisfies ``predicate`` (for error messages and checks)."""
    return [name for name, spec in ATTACKS.items() if predicate(spec)]
