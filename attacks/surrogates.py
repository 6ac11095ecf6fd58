"""Attack-time surrogates: BPDA (Athalye, Carlini & Wagner 2018, "Obfuscated Gradients Give a False Sense of
Security") for any module whose forward pass gives an attacker no useful gradient.

sign() in a binary layer and rounding in a bit-depth squeezer have zero derivative almost everywhere, so a
white-box attack through them sees no gradient and reports robustness that is not there. BPDA keeps the
forward pass and replaces the backward pass while the attacker crafts examples. Which replacements make sense
is the module's knowledge, so the module declares them; the evaluation only chooses one by name:

    @register_surrogates
    class Squeezer(nn.Module):
        SURROGATES = ("exact", "identity")   # names it understands; the first is its own (training) behaviour
        BPDA = "identity"                     # the one ``bpda: true`` selects
        SURROGATE_LABEL = "squeeze={}"        # how a setting that chooses one is named in results
        surrogate = "exact"                   # the one in use: forward() reads it

        def forward(self, x):
            ...

An attack setting then writes ``surrogate: identity`` (that exact surrogate, on every module declaring it) or
``bpda: true`` (each module's own ``BPDA``); the evaluation applies it with :func:`use_surrogate` /
:func:`use_bpda` while crafting, and evaluates the examples on the module's own behaviour.

This module knows no network: networks register their classes here (``advtrain.networks.binary``,
``advtrain.networks.squeeze``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_LABELS: dict[str, str] = {}  # surrogate name -> label format, filled by register_surrogates


def register_surrogates(cls: type) -> type:
    """Class decorator: record ``cls.SURROGATES`` (with ``cls.SURROGATE_LABEL``) as names attack settings may
    choose. Checks the declaration: a non-empty tuple of names, ``BPDA`` (if any) among them."""
    names = tuple(getattr(cls, "SURROGATES", ()))
    if not names or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{cls.__name__}.SURROGATES must be a non-empty tuple of names, got {names!r}")
    bpda = getattr(cls, "BPDA", None)
    if bpda is not None and bpda not in names:
        raise TypeError(f"{cls.__name__}.BPDA {bpda!r} is not one of its SURROGATES {names}")
    label = getattr(cls, "SURROGATE_LABEL", "surrogate={}")
    for name in names:
        if _LABELS.get(name, label) != label:
            raise TypeError(f"surrogate {name!r} of {cls.__name__} is already registered with the label "
                            f"{_LABELS[name]!r}; choose another name")
        _LABELS[name] = label
    return cls


def known_surrogates() -> list[str]:
    """Every surrogate name a registered module class declares."""
    return sorted(_LABELS)


def check_surrogate_name(name: str) -> str:
    if name not in _LABELS:
        raise ValueError(f"unknown surrogate {name!r}; choose one of {', '.join(known_surrogates()) or 'none'} "
                         "(names declared by the networks' modules), or bpda: true for each module's own BPDA")
    return name


def surrogate_label(name: str) -> str:
    """How a setting crafted with surrogate ``name`` is labelled, e.g. ``sign'=tanh``."""
    return _LABELS.get(name, "surrogate={}").format(name)


def surrogate_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` (itself included) that declare surrogates."""
    return [m for m in model.modules() if getattr(type(m), "SURROGATES", ())]


@contextmanager
def _set_surrogates(choices: list[tuple[nn.Module, str]]) -> Iterator[None]:
    saved = [(m, m.surrogate) for m, _ in choices]
    for module, name in choices:
        module.surrogate = name
    try:
        yield
    finally:
        for module, old in saved:
            module.surrogate = old


@contextmanager
def use_surrogate(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Every module of ``model`` that declares surrogate ``name`` uses it for the body (restored on exit).

    Raises ``ValueError`` when no module declares it: an attack setting asked for a surrogate the network
    cannot honour, and silently attacking without it would report the wrong threat model."""
    check_surrogate_name(name)
    modules = [m for m in surrogate_modules(model) if name in type(m).SURROGATES]
    if not modules:
        offered = sorted({n for m in surrogate_modules(model) for n in type(m).SURROGATES})
        raise ValueError(f"surrogate {name!r}: no module of {type(model).__name__} declares it"
                         + (f"; its modules offer {', '.join(offered)}" if offered else
                            " (it has no module with surrogates: nothing to replace)"))
    with _set_surrogates([(m, name) for m in modules]):
        yield model


@contextmanager
def use_bpda(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` that declares a ``BPDA`` surrogate uses it for the body (restored on exit).

    Raises ``ValueError`` when no module declares one (``bpda: true`` on a network with nothing to approximate
    is a configuration mistake, not a stronger attack)."""
    modules = [m for m in surrogate_modules(model) if getattr(type(m), "BPDA", None) is not None]
    if not modules:
        raise ValueError(f"bpda: no module of {type(model).__name__} declares a BPDA surrogate (a "
                         "non-differentiable layer such as advtrain.networks.FeatureSqueezing or an XNOR layer)")
    with _set_surrogates([(m, type(m).BPDA) for m in modules]):
        yield model
