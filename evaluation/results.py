"""The results of one robustness evaluation as data: what the callback computes, ``write_results`` writes,
``advtrain report`` and ``advtrain transfer`` read.

A results file (``robustness*.json``) is :meth:`EvaluationResults.to_dict`; :meth:`EvaluationResults.read` turns
one back into these classes. Each attacked setting is a :class:`SettingResult` with a *role*: one of the suite, a
transfer run (the suite's setting crafted on another network) or a sanity run (PGD at eps 0 and at a large eps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

ROLES = ("suite", "transfer", "sanity")


@dataclass
class Accuracy:
    """Correct examples out of ``n``; for a randomized network the mean over draws, its standard deviation and the
    worst case (correct in every draw). For a deterministic one all three are the same number."""

    correct: int
    n: int
    accuracy: float
    accuracy_std: float = 0.0
    accuracy_worst: float | None = None

    def __post_init__(self):
        if self.accuracy_worst is None:
            self.accuracy_worst = self.accuracy

    @classmethod
    def of(cls, per_example: Tensor, per_draw: Tensor, draws: int) -> Accuracy:
        """``per_example``: draws survived per example; ``per_draw``: examples correct per draw."""
        n = max(len(per_example), 1)
        per_draw_accuracy = per_draw.double() / n
        return cls(correct=int((per_example == draws).sum()), n=len(per_example),
                   accuracy=float(per_draw_accuracy.mean()),
                   accuracy_std=float(per_draw_accuracy.std()) if draws > 1 else 0.0,
                   accuracy_worst=float((per_example == draws).double().sum() / n))

    @classmethod
    def counted(cls, correct: int, n: int) -> Accuracy:
        """A deterministic count."""
        return cls(correct=correct, n=n, accuracy=correct / max(n, 1))

    def to_dict(self) -> dict:
        return {"correct": self.correct, "n": self.n, "accuracy": self.accuracy, "accuracy_std": self.accuracy_std,
                "accuracy_worst": self.accuracy_worst}

    @classmethod
    def from_dict(cls, d: dict) -> Accuracy:
        return cls(int(d.get("correct", 0)), int(d.get("n", 0)), float(d["accuracy"]),
                   float(d.get("accuracy_std", 0.0)), d.get("accuracy_worst"))


@dataclass
class SettingResult:
    """One attacked setting: the setting as recorded (``AttackSetting.as_dict()``), its accuracy, what it cost.

    Transfer rows carry the white-box accuracy of the same setting (``white_box_accuracy``) and name their
    source in ``setting["surrogate"]``. AutoAttack rows carry ``autoattack``: the points correct at its clean check,
    robust after each stage, and with zero gradient at its DLR stage (its official checks read them).
    ``robust_fraction`` (per example, the fraction of draws it survived) is
    kept in memory for the sanity checks' paired noise and is not written.
    """

    setting: dict
    name: str
    score: Accuracy
    seconds: float = 0.0
    role: str = "suite"
    metrics: dict[str, float] | None = None
    single_draw_gradient: bool | None = None
    white_box_accuracy: float | None = None
    autoattack: dict | None = None
    robust_fraction: list[float] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")

    # what the checks, the tables and the report read most
    @property
    def accuracy(self) -> float:
        return self.score.accuracy

    @property
    def attack(self) -> str:
        return self.setting["attack"]

    @property
    def eps(self) -> float | None:
        return self.setting.get("eps")

    def to_dict(self) -> dict:
        entry = {**self.setting, "name": self.name, **self.score.to_dict(), "seconds": self.seconds}
        if self.metrics is not None:
            entry["metrics"] = self.metrics
        if self.single_draw_gradient is not None:
            entry["single_draw_gradient"] = self.single_draw_gradient
        if self.white_box_accuracy is not None:
            entry["white_box_accuracy"] = self.white_box_accuracy
        if self.autoattack is not None:
            entry["autoattack"] = self.autoattack
        return entry

    @classmethod
    def from_dict(cls, d: dict, role: str = "suite") -> SettingResult:
        own = {"name", "correct", "n", "accuracy", "accuracy_std", "accuracy_worst", "seconds",
               "single_draw_gradient", "white_box_accuracy", "robust_fraction", "autoattack"}
        setting = {k: v for k, v in d.items() if k not in own}
        metrics = setting.pop("metrics", None)
        return cls(setting=setting, name=str(d["name"]), score=Accuracy.from_dict(d),
                   seconds=float(d.get("seconds", 0.0)), role=role,
                   metrics=metrics if isinstance(metrics, dict) else None,
                   single_draw_gradient=d.get("single_draw_gradient"),
                   white_box_accuracy=d.get("white_box_accuracy"), autoattack=d.get("autoattack"),
                   robust_fraction=d.get("robust_fraction"))


@dataclass
class Verdict:
    """The outcome of one sanity check; a failed one names the likely cause."""

    check: str
    passed: bool
    detail: str
    likely_cause: str | None = None

    @classmethod
    def of(cls, check: str, passed: bool, detail: str, cause: str) -> Verdict:
        return cls(check, bool(passed), detail, None if passed else cause)

    def to_dict(self) -> dict:
        return {"check": self.check, "passed": self.passed, "detail": self.detail, "likely_cause": self.likely_cause}

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        return cls(d["check"], bool(d["passed"]), d.get("detail", ""), d.get("likely_cause"))


@dataclass
class EvaluationResults:
    """Everything one evaluation measured, and what identifies the weights and the run it measured.

    ``attacks`` (the suite), ``transfer`` and ``sanity_runs`` are the settings by role; ``per_example`` maps
    ``clean`` and each suite setting's name to the draws each example survived (0/1 for a deterministic network).
    ``path`` is the file the results were read from or written to (not part of the file).
    """

    n: int
    randomized: bool
    draws: int
    clean: Accuracy
    precision: str = "32"
    attacks: list[SettingResult] = field(default_factory=list)
    transfer: list[SettingResult] = field(default_factory=list)
    sanity_runs: list[SettingResult] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    per_example: dict[str, list[int]] = field(default_factory=dict)
    per_example_metrics: dict[str, dict[str, list[float]]] | None = None
    note: str | None = None
    split: str = "test"
    seed: int = 0
    model: str | None = None
    network: str | None = None
    model_hash: str | None = None
    checkpoint: str | None = None
    epoch: int | None = None
    world_size: int | None = None
    global_step: int | None = None
    fingerprint: str | None = None
    time: str | None = None
    path: Path | None = field(default=None, compare=False, repr=False)

    IDENTITY = ("model", "network", "model_hash", "checkpoint", "epoch", "world_size", "global_step", "fingerprint",
                "time")

    @property
    def failed_verdicts(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.passed]

    def to_dict(self) -> dict:
        out = {"split": self.split, "n": self.n, "seed": self.seed, "randomized": self.randomized,
               "draws": self.draws, "precision": self.precision, "clean": self.clean.to_dict(),
               "attacks": [a.to_dict() for a in self.attacks],
               "transfer": [t.to_dict() for t in self.transfer],
               "sanity": {"runs": [r.to_dict() for r in self.sanity_runs],
                          "verdicts": [v.to_dict() for v in self.verdicts]},
               "per_example": self.per_example}
        if self.per_example_metrics:
            out["per_example_metrics"] = self.per_example_metrics
        if self.note is not None:
            out["note"] = self.note
        return out | {name: getattr(self, name) for name in self.IDENTITY}

    @classmethod
    def from_dict(cls, d: dict, path: Path | None = None) -> EvaluationResults:
        sanity = d.get("sanity") or {}
        return cls(n=int(d.get("n", 0)), randomized=bool(d.get("randomized", False)), draws=int(d.get("draws", 1)),
                   clean=Accuracy.from_dict(d["clean"]), precision=str(d.get("precision", "32")),
                   attacks=[SettingResult.from_dict(a) for a in d["attacks"]],
                   transfer=[SettingResult.from_dict(t, "transfer") for t in d.get("transfer", [])],
                   sanity_runs=[SettingResult.from_dict(r, "sanity") for r in sanity.get("runs", [])],
                   verdicts=[Verdict.from_dict(v) for v in sanity.get("verdicts", [])],
                   per_example=d.get("per_example", {}), per_example_metrics=d.get("per_example_metrics"),
                   note=d.get("note"), split=d.get("split", "test"), seed=d.get("seed", 0),
                   **{name: d.get(name) for name in cls.IDENTITY}, path=path)

    @classmethod
    def read(cls, path: str | Path) -> EvaluationResults:
        """One results file; ``ValueError`` when it is not one (the message says what is wrong)."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()), path=path)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a readable robustness result ({type(e).__name__}: {e})") from e
