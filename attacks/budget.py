"""Parsing and checking of attack budgets ("8/255", 0.3, ...)."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any


def parse_budget(value: float | str, name: str = "eps") -> float:
    """Return a budget as a float.

    Accepts numbers and strings such as ``"0.3"`` or ``"8/255"`` (the papers' notation for [0, 1]
    images). Raises ``ValueError`` naming ``name`` for anything negative, non-finite or unparsable.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number or a fraction like '8/255', got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{name}: cannot read {value!r}; write a number like 0.03 or a fraction "
                             f"like '8/255'") from None
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise ValueError(f"{name} must be a number or a fraction like '8/255', got {value!r}")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def format_budget(value: float) -> str:
    """Write a budget the way papers do: ``0.3`` when that is short, else ``8/255`` when it is a whole
    number of 1/255 steps."""
    short = f"{value:g}"
    scaled = value * 255
    if len(short) > 5 and abs(scaled - round(scaled)) < 1e-6:
        return f"{round(scaled)}/255"
    return short


def check_steps(steps: int, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {steps!r}")
    return steps


def from_text(value: Any) -> Any:
    """A value from the command line (``--model.init_args.attack.steps 3`` arrives as the string "3") as YAML
    would read it; fractions such as "8/255" stay strings for ``parse_budget``."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
