"""One attack setting (attack x budget x steps x restarts x its own parameters) as data.

``AttackSetting`` is what configs write, e.g. ``{attack: pgd, eps: [2/255, 8/255], steps: 20}`` or
``{attack: lrc, eps: 0.1, zeta: 8, samples: 100}`` or ``{attack: deepfool}``. It checks itself against the
attack's row in :data:`advtrain.attacks.registry.ATTACKS` when built, so a typo or an impossible budget fails when the
config is read, not hours into a run.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from .budget import check_steps, format_budget, from_text, parse_budget
from .core import NORMS
from .registry import ATTACKS, KURAKIN, AttackSpec, attacks_with, check_attack_name, plural
from .standard import bim_steps
from .surrogates import check_surrogate_name, surrogate_label


@dataclass(init=False)
class AttackSetting:
    """One attack configuration.

    Args:
        attack: a row of :data:`advtrain.attacks.registry.ATTACKS` (docs/evaluation.md lists them).
        eps: the budget in the input's natural range, e.g. ``8/255`` or ``0.3``; a list expands into one setting
            per budget (:meth:`expand`). Unset: 8/255. DeepFool has no budget (leave it unset).
        steps: iterations (None: the attack's default: bim Kurakin's count, pgd/mim 10, gama 100, deepfool 50), or
            ``kurakin`` for Kurakin's count floor(min(eps + 4, 1.25 eps)) (eps in 1/255) with any iterative attack.
        step: step size (None: pgd 2.5 eps / steps, mim eps / steps, bim 1/255, gama_pgd 2 eps, i.e. 16/255 at
            8/255, divided by 10 at iterations 60 and 85; for gama_fw the Frank-Wolfe gamma, 0.5).
        restarts: random restarts, keeping each example's worst case (needs a random start).
        norm: one the attack supports (``linf`` for most; ``l2`` for pgd, pgd_targeted, autoattack; deepfool is l2).
        version: autoattack only: ``standard`` or ``rand``; None chooses ``rand`` for a randomized model (the
            evaluation detects it) and ``standard`` otherwise.
        eot: expectation over transformation for randomized models: each gradient is the mean over this many
            forward passes (the attacks whose row has ``eot``; AutoAttack ``rand`` has its own, 20).
        omniscient: craft the examples on the network with its randomness off (Tucker theta = 1), then test
            them on the randomized network (defensive tensorization, Table 3). The evaluation applies it.
        surrogate: a backward surrogate (BPDA, :mod:`advtrain.attacks.surrogates`) by name, on every module that
            declares it: ``ste``, ``tanh``, ``tanh0.75`` for binary (XNOR) layers' sign, ``identity`` or
            ``oblivious`` for feature squeezing. Applied by the evaluation.
        bpda: craft with each non-differentiable module's own BPDA surrogate (Athalye et al. 2018).
        **params: the attack's own parameters (its row's ``params``), e.g. ``target`` for pgd_targeted, ``zeta``
            and ``samples`` for lrc, ``overshoot`` for deepfool.
    """

    attack: str
    eps: Any
    steps: int | str | None
    step: float | str | None
    restarts: int
    norm: str
    version: str | None
    eot: int
    omniscient: bool
    surrogate: str | None
    bpda: bool
    params: dict
    _eps_list: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __init__(self, attack: str = "pgd", eps: Any = None, steps: int | str | None = None,
                 step: float | str | None = None, restarts: int = 1, norm: str | None = None,
                 version: str | None = None, eot: int = 1, omniscient: bool = False, surrogate: str | None = None,
                 bpda: bool = False, params: dict | None = None, **more: Any):
        self.attack = check_attack_name(attack)
        spec = self.spec
        self.eps = eps
        self.steps, self.step, self.restarts, self.version = steps, step, restarts, version
        self.norm = spec.norms[0] if norm is None else norm
        self.eot, self.omniscient, self.surrogate, self.bpda = eot, omniscient, surrogate, bpda
        self.params = self._check_params({**(params or {}), **more})
        self._eps_list = self._check_budget(eps)
        self._check_schedule()
        self._check_threat_model()

    @classmethod
    def from_config(cls, entry: dict | str | AttackSetting | None, eps: float | None, where: str,
                    default: dict | None = None) -> AttackSetting:
        """A defense's attack as a config writes it, as in an evaluation suite: ``{attack: pgd, steps: 10, step:
        2/255}`` or a row's name; the budget is ``eps`` (the defense's threat model) unless the entry gives one. An
        entry without ``attack`` changes ``default`` (``--model.init_args.attack.steps 3`` on the command line)."""
        if isinstance(entry, AttackSetting):
            return entry
        if entry is None:
            entry = dict(default or {})
        if isinstance(entry, str):
            entry = {"attack": entry}
        if isinstance(entry, dict):
            entry = {key: from_text(value) for key, value in entry.items()}
            if "attack" not in entry and default is not None:
                entry = {**default, **entry}
        if not isinstance(entry, dict) or "attack" not in entry:
            raise ValueError(f"{where}: an attack is a mapping such as {{attack: pgd, steps: 10}}, got {entry!r}")
        check_attack_name(entry["attack"])
        if ATTACKS[entry["attack"]].budget and eps is not None:
            entry = {"eps": eps, **entry}
        setting = cls(**entry)
        if len(setting.expand()) != 1:
            raise ValueError(f"{where}: one budget, not a list ({entry.get('eps')!r})")
        return setting.expand()[0]

    # ---- validation against the attack's row --------------------------------------------------
    @property
    def spec(self) -> AttackSpec:
        return ATTACKS[self.attack]

    def _check_params(self, given: dict) -> dict:
        spec = self.spec
        unknown = sorted(set(given) - set(spec.params))
        if unknown:
            takes = ["eps"] * spec.budget + list(spec.tunable) + ["restarts"] * spec.restarts + ["eot"] * spec.eot
            takes += ["norm"] * (len(spec.norms) > 1) + ["version"] * bool(spec.variants) + list(spec.params)
            raise ValueError(f"{self.attack}: unknown parameter {', '.join(map(repr, unknown))}; {self.attack} takes "
                             f"{', '.join(takes) or 'no parameters'} (and omniscient, surrogate, bpda)")
        return {name: param.check(self.attack, name, given.get(name, param.default))
                for name, param in spec.params.items()}

    def _check_budget(self, eps: Any) -> list:
        if not self.spec.budget:
            if eps is not None:
                raise ValueError(f"{self.attack} has no budget: it searches for the smallest perturbation; "
                                 "remove eps (its metrics report the perturbation size)")
            return [None]
        if eps is None:
            eps = self.eps = "8/255"
        budgets = eps if isinstance(eps, (list, tuple)) else [eps]
        if not budgets:
            raise ValueError(f"{self.attack}: eps is an empty list")
        return [parse_budget(e, f"{self.attack} eps") for e in budgets]

    def _check_schedule(self) -> None:
        spec, attack = self.spec, self.attack
        for name, value in (("steps", self.steps), ("step", self.step)):
            if value is None or name in spec.tunable:
                continue
            if spec.kind == "single_step":
                if name == "steps" and value == 1:
                    continue
                raise ValueError(f"{attack} is single-step ({name} must be unset" + (" or 1" if name == "steps" else "")
                                 + "); use bim or pgd for more steps")
            raise ValueError(f"{attack} takes no {name}" + (f": {spec.fixed}" if spec.fixed else ""))
        if self.step is not None:
            self.step = parse_budget(self.step, f"{attack} step")
        kurakin = self.steps == KURAKIN and spec.budget and "steps" in spec.tunable
        if isinstance(self.steps, str) and not kurakin:
            raise ValueError(f"{attack} steps: an integer, or '{KURAKIN}' for iterative attacks, got {self.steps!r}")
        elif self.steps is not None and not kurakin:
            check_steps(self.steps, f"{attack} steps")
        check_steps(self.restarts, f"{attack} restarts")
        if self.restarts > 1 and not spec.restarts:
            raise ValueError(f"{attack} has no random start, so restarts={self.restarts} would repeat the same "
                             "attack; use pgd for restarts")

    def _check_threat_model(self) -> None:
        spec, attack = self.spec, self.attack
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if self.norm not in spec.norms:
            supported = attacks_with(lambda s: self.norm in s.norms)
            raise ValueError(f"norm {self.norm!r} is supported by {plural(supported)} only, not {attack}")
        check_steps(self.eot, f"{attack} eot")
        if self.eot > 1 and not spec.eot:
            raise ValueError(f"eot is supported by {', '.join(attacks_with(lambda s: s.eot))}; {attack} has none "
                             "(autoattack: use version 'rand', which averages 20 draws)")
        if self.version is not None and self.version not in spec.variants:
            owners = attacks_with(lambda s: bool(s.variants))
            raise ValueError(f"version {self.version!r}: only {plural(owners)} has versions"
                             + (f" ({', '.join(spec.variants)})" if spec.variants else ""))
        if self.surrogate is not None and check_surrogate_name(self.surrogate) and self.bpda:
            raise ValueError(f"{attack}: give either bpda: true (each module's own BPDA) or surrogate: "
                             f"{self.surrogate} (that one), not both")

    # ---- budgets and resolved defaults ----------------------------------------------------------
    def expand(self) -> list[AttackSetting]:
        """One setting per budget."""
        if not self.spec.budget:
            return [replace(self)]
        return [replace(self, eps=e) for e in self._eps_list]

    @property
    def budget(self) -> float | None:
        """The single budget (None for an attack without one)."""
        if len(self._eps_list) != 1:
            raise ValueError("this setting has several budgets; call expand() first")
        return self._eps_list[0]

    @property
    def resolved_steps(self) -> int:
        spec = self.spec
        if self.steps == KURAKIN:
            return bim_steps(self.budget)
        if self.steps is not None:
            return self.steps
        if callable(spec.steps):
            return spec.steps(self.budget)
        return 1 if spec.steps is None else spec.steps

    @property
    def resolved_step(self) -> float | None:
        if self.step is not None:
            return float(self.step)
        rule = self.spec.step
        return None if rule is None else rule(self.budget, self.resolved_steps, self.params)

    @property
    def name(self) -> str:
        """A short label such as ``pgd-20x5 linf eps=8/255`` or ``lrc zeta=4 eps=0.1``."""
        spec = self.spec
        label = self.attack if self.version is None else f"{self.attack}-{self.version}"
        if "steps" in spec.tunable:
            label += f"-{self.resolved_steps}"
        if self.restarts > 1:
            label += f"x{self.restarts}"
        if self.norm != spec.norms[0]:
            label += f" {self.norm}"
        for key, param in spec.params.items():
            value = self.params[key]
            if key in spec.label_params or value != param.default:
                label += f" {key}={format_budget(value) if isinstance(value, float) else value}"
        if self.eot > 1:
            label += f" eot{self.eot}"
        if self.omniscient:
            label += " omniscient"
        if self.surrogate is not None:
            label += f" {surrogate_label(self.surrogate)}"
        if self.bpda:
            label += " bpda"
        return label if not spec.budget else f"{label} eps={format_budget(self.budget)}"

    def as_dict(self) -> dict:
        """The setting as recorded in results files."""
        spec = self.spec
        budget = self.budget
        entry = {"attack": self.attack, "eps": budget, "eps_label": None if budget is None else format_budget(budget),
                 "norm": self.norm, "steps": self.resolved_steps, "step": self.resolved_step,
                 "restarts": self.restarts, "steps_rule": KURAKIN if self.steps == KURAKIN else None,
                 "eot_samples": self.eot, "omniscient": self.omniscient, "surrogate": self.surrogate,
                 "bpda": self.bpda, **self.params}
        if spec.metrics:
            entry["metrics"] = list(spec.metrics)
        if spec.records is not None:
            entry.update(spec.records(self))
        return entry

    # ---- training ---------------------------------------------------------------------------------
    def required_context(self) -> list[str]:
        """The context keywords the attack's function cannot do without."""
        parameters = inspect.signature(self.spec.function).parameters
        return [name for name in self.spec.context
                if name not in parameters or parameters[name].default is inspect.Parameter.empty]

    def check_training(self, provides: tuple[str, ...], who: str) -> AttackSetting:
        """Refuse a row that cannot train, or one that needs per-batch context ``who`` (a defense) does not
        provide; returns the setting."""
        if not self.spec.trains:
            raise ValueError(f"{who}: {self.attack} is not a training attack; choose one of "
                             f"{plural(attacks_with(lambda s: s.trains))}")
        missing = [name for name in self.required_context() if name not in provides]
        if missing:
            raise ValueError(f"{who}: {self.attack} needs {plural(missing)} from the defense that runs it, which "
                             f"{who} does not provide; choose an attack without context, e.g. pgd")
        return self

    # ---- running ----------------------------------------------------------------------------------
    def keywords(self) -> dict:
        """The keyword arguments the attack's function receives (besides model, inputs, bounds, generator)."""
        spec = self.spec
        given = dict(self.params)
        if spec.budget:
            given["eps"] = self.budget
        if "steps" in spec.tunable:
            given["steps"] = self.resolved_steps
        if "step" in spec.tunable:
            given["step"] = self.resolved_step
        if spec.restarts:
            given["restarts"] = self.restarts
        if spec.eot:
            given["eot"] = self.eot
        if len(spec.norms) > 1:
            given["norm"] = self.norm
        if spec.variants:
            given["version"] = self.version or spec.variants[0]
        return {spec.keywords.get(k, k): v for k, v in given.items()}

    def run(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
            bounds: tuple[float, float] = (0.0, 1.0), **context: Any) -> Tensor:
        """Generate adversarial examples for one batch (the caller sets the model's mode and threat model).
        ``context``: what a training attack's row declares (others are ignored); an evaluation passes none."""
        given = {name: value for name, value in context.items() if name in self.spec.context}
        missing = [name for name in self.required_context() if name not in given]
        if missing:
            raise ValueError(f"{self.attack} runs in training only: it needs {plural(missing)} from a defense")
        return self.spec.function(model, x, y, bounds=bounds, generator=generator, **self.keywords(), **given)
