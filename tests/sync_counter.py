"""Counting host-device syncs on the CPU: what a CUDA host would wait for (value reads, host-to-device copies,
ops whose output size depends on values). :class:`SyncCounter` and the ``counter`` fixture (installed by the root
conftest.py) are used by tests/defenses/test_host_syncs.py and the covariance tracker's tests."""

from __future__ import annotations

import functools
import os
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import advtrain.attacks.nuclear

VALUE_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
# functions that copy host data to the device when given one
HOST_TO_DEVICE = ("tensor", "as_tensor")
# aten overload packets that sync on CUDA whatever their arguments
SYNCING_OPS = {"_local_scalar_dense", "equal", "nonzero", "_unique", "_unique2", "unique_dim", "unique_consecutive",
               "unique_dim_consecutive", "masked_select", "bincount"}
# ... and those that sync only for some arguments (tensor repeats, boolean masks among the indices)
REPEATS_BY_TENSOR = {"aten.repeat_interleave.Tensor", "aten.repeat_interleave.self_Tensor"}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE)) + os.sep
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _call_site() -> str:
    """Who asked for the value: the innermost frame outside torch and this file, and the innermost frame of this
    repository's code when that is another one (``lightning/...:662 (__to_tensor) <- defenses/base.py:150``)."""
    sites = []
    frame = sys._getframe(2)
    while frame is not None and len(sites) < 2:
        path = os.path.abspath(frame.f_code.co_filename)
        ours = path.startswith(REPO) and os.sep + "site-packages" + os.sep not in path
        if path != HERE and not path.startswith(TORCH_DIR) and "contextlib" not in path and (ours or not sites):
            sites.append(f"{os.path.relpath(path, REPO if ours else None)}:{frame.f_lineno} ({frame.f_code.co_name})")
            if ours:
                break
        frame = frame.f_back
    return " <- ".join(sites) or "?"


class SyncCounter:
    """Counts, while :meth:`counting` is active, every operation that would make a CUDA host wait.

    ``counts`` holds what happened outside the exempted function, ``exempted`` what happened inside it;
    ``sites`` keeps up to three call sites per kind for the failure message. A value read counts once (the
    ``_local_scalar_dense`` that ``.item()`` reaches is not counted again).
    """

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.exempted: Counter[str] = Counter()
        self.exempt_calls = 0
        self.sites: dict[str, list[str]] = {}
        self.active = False
        self._uncounted = 0  # > 0 inside a counted Python-level read (its aten ops are not counted again)
        self._exempt = 0  # > 0 inside the exempted function

    def record(self, kind: str) -> None:
        if not self.active or self._uncounted:
            return
        (self.exempted if self._exempt else self.counts)[kind] += 1
        sites = self.sites.setdefault(kind, [])
        if len(sites) < 3:
            site = _call_site()
            if site not in sites:
                sites.append(site)

    @contextmanager
    def counting(self):
        was_active, self.active = self.active, True
        try:
            with _SyncOps(self):
                yield self
        finally:
            self.active = was_active

    @contextmanager
    def uncounted(self):
        self._uncounted += 1
        try:
            yield
        finally:
            self._uncounted -= 1

    def exempt(self, fn: Callable) -> Callable:
        """``fn`` with whatever it does counted in ``exempted`` instead of ``counts``."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self.active:
                self.exempt_calls += 1
            self._exempt += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._exempt -= 1

        return wrapper

    def report(self) -> str:
        return "; ".join(f"{kind} x{n} at {', '.join(self.sites.get(kind, []))}" for kind, n in self.counts.items())


class _SyncOps(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS or str(func) in REPEATS_BY_TENSOR:
            self.counter.record(f"aten.{name}")
        elif name in INDEXING and _has_mask(args[1] if len(args) > 1 else kwargs.get("indices")):
            self.counter.record(f"aten.{name} with a boolean mask")
        return func(*args, **kwargs)


def _has_mask(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


@pytest.fixture
def counter(monkeypatch) -> SyncCounter:
    """A :class:`SyncCounter` with its Python-level wrappers installed for the test (idle until ``counting()``)
    and NuAT's ``nuclear_norm`` exempted wherever a module of the package holds it."""
    counter = SyncCounter()

    def counting_read(name, original):
        @functools.wraps(original)
        def read(self, *args, **kwargs):
            counter.record(f"Tensor.{name}")
            with counter.uncounted():
                return original(self, *args, **kwargs)

        return read

    for name in VALUE_READS:
        monkeypatch.setattr(torch.Tensor, name, counting_read(name, getattr(torch.Tensor, name)))

    def counting_copy(name, original):
        @functools.wraps(original)
        def copy(*args, **kwargs):
            device = kwargs.get("device", args[2] if name == "as_tensor" and len(args) > 2 else None)
            if device is not None:
                counter.record(f"torch.{name}(..., device=...)")
            with counter.uncounted():
                return original(*args, **kwargs)

        return copy

    for name in HOST_TO_DEVICE:
        monkeypatch.setattr(torch, name, counting_copy(name, getattr(torch, name)))

    one_hot = torch.nn.functional.one_hot

    @functools.wraps(one_hot)
    def counting_one_hot(tensor, num_classes=-1):
        if num_classes < 0:  # the number of classes is read back from the labels, on every device
            counter.record("F.one_hot without num_classes")
        with counter.uncounted():  # given num_classes, only the CPU kernel reads the labels' min and max back
            return one_hot(tensor, num_classes)

    monkeypatch.setattr(torch.nn.functional, "one_hot", counting_one_hot)

    original = advtrain.attacks.nuclear.nuclear_norm
    exempted = counter.exempt(original)
    for module in list(sys.modules.values()):
        if (getattr(module, "__name__", "").startswith(("advtrain.attacks", "advtrain.defenses"))
                and getattr(module, "nuclear_norm", None) is original):
            monkeypatch.setattr(module, "nuclear_norm", exempted)
    return counter
