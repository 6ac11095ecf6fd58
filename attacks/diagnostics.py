"""What an attack measured besides its examples, handed to whoever evaluates it: AutoAttack's per-stage report
(how many points each stage broke, how many had a zero gradient), which the evaluation turns into the official
AutoAttack checks (``advtrain.evaluation.autoattack_checks``). A context variable rather than a wider return
value: every attack of the table keeps returning ``x_adv`` alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_REPORTS: ContextVar[list[dict] | None] = ContextVar("attack_reports", default=None)


@contextmanager
def collecting_reports() -> Iterator[list[dict]]:
    """Collect the reports that attacks hand in while the block runs (nested blocks collect their own)."""
    reports: list[dict] = []
    token = _REPORTS.set(reports)
    try:
        yield reports
    finally:
        _REPORTS.reset(token)


def hand_in(report: dict) -> None:
    """Give ``report`` to the innermost :func:`collecting_reports` block; nothing happens outside one."""
    reports = _REPORTS.get()
    if reports is not None:
        reports.append(report)


__all__ = ["collecting_reports", "hand_in"]
