"""Test-time randomness, declared by the modules that have it, as modules declare their BPDA surrogates.

A module class with randomness sets ``RANDOMNESS = ("theta", 1.0)``: the attribute that sets how random it is,
and the value at which it is deterministic (Tucker layers: the keep probability theta of their rank components,
deterministic at 1). The helpers here find every declaring submodule of a network, so that the evaluation (the
omniscient attacker), the loss landscapes and debugging turn randomness off, or set it, without knowing which kind
of randomized layer a network holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from torch import nn

from .wrapper import temporarily_set


def random_modules(network: nn.Module) -> list[nn.Module]:
    """The submodules of ``network`` (itself included) whose class declares ``RANDOMNESS``."""
    return [m for m in network.modules() if getattr(type(m), "RANDOMNESS", None)]


def declares_randomness(network: nn.Module) -> bool:
    return bool(random_modules(network))


@contextmanager
def _set_each(network: nn.Module, value_of) -> Iterator[nn.Module]:
    with ExitStack() as stack:
        for module in random_modules(network):
            attribute, off = type(module).RANDOMNESS
            stack.enter_context(temporarily_set([module], attribute, value_of(off)))
        yield network


def randomness_off(network: nn.Module):
    """Context manager: every declaring module at its deterministic value (restored on exit): the omniscient
    attacker's network (Tucker layers: theta = 1, the full weights)."""
    return _set_each(network, lambda off: off)


def randomness_at(network: nn.Module, level: float):
    """Context manager: every declaring module's randomness attribute set to ``level`` (restored on exit), e.g. a
    loss landscape drawn at several Tucker keep probabilities."""
    return _set_each(network, lambda off: level)
