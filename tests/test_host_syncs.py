"""No host-device sync inside a training step, counted on CPU so that a regression shows without a GPU.

docs/design.md ("Performance principles"): nothing in a training step may call .item(), .cpu() or branch on a tensor
value; NuAT's SVD is the one known host sync. On a GPU, ``make test-gpu`` checks this with
``torch.cuda.set_sync_debug_mode("error")`` (tests/test_gpu.py). A CPU never waits for itself, so here the
operations that would make a CUDA host wait are counted instead:

* reads of a tensor's value from Python: ``Tensor.item``, ``.tolist``, ``.cpu``, ``.numpy`` and ``bool()``,
  ``float()``, ``int()``, ``operator.index()`` of a tensor (an ``if`` on a tensor is a ``bool()``), patched on
  ``torch.Tensor`` with counting wrappers;
* host data copied to the device: ``torch.tensor`` / ``torch.as_tensor`` given a ``device`` (a blocking copy on
  CUDA, which waits for all queued work; Lightning's ``self.log`` of a Python number makes one);
* the aten ops that sync on CUDA, seen by a ``TorchDispatchMode`` so that library code and composite ops count too:
  ``_local_scalar_dense`` (what every value read reaches), ``equal``, and the ops whose output shape depends on
  the values: ``nonzero``, ``unique`` (torchmetrics' ``validate_args`` on labels), ``masked_select``, ``bincount``,
  ``repeat_interleave`` with tensor repeats, indexing with a boolean mask.

``F.one_hot(y, num_classes)`` reads min and max of the labels back on CPU only (CUDA checks them with device
asserts), so those reads are not counted; ``F.one_hot(y)`` without ``num_classes`` syncs everywhere and counts.

What is counted is a real ``training_step`` inside ``Trainer.fit`` (digits, a small CNN): the adversarial
example, the forward passes, the loss, the accuracy metric updates and the ``self.log`` calls. Lightning's
bookkeeping around the step (reading logged values back for the loggers) is not ours and is not counted. Two
steps run, so first-step and steady-state paths are both seen, with ``log_every_n_steps=1`` so that both take
the logging-step branches (PGD-AT's clean-accuracy forward). GAMA-PGD and GAMA-FW, evaluation attacks, are counted
around the attack call.

NuAT: :func:`advtrain.attacks.nuclear.nuclear_norm` (the SVD) is the documented exception. What happens inside it is
counted apart (on CPU the SVD reads nothing back; on CUDA it syncs once per call); everything around it must
count zero.
"""

from __future__ import annotations

import functools
import operator
import os
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager

import pytest
import pytorch_lightning as pl
import torch
from helpers import every_defense
from torch.utils._python_dispatch import TorchDispatchMode
from torchmetrics.classification import MulticlassAccuracy

import advtrain.attacks.nuclear
from advtrain.attacks import gama_fw, gama_pgd
from advtrain.datamodules import Digits
from advtrain.defenses import Standard
from advtrain.networks import DigitsCNN

# reads of a tensor's value from Python
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


def _network() -> DigitsCNN:
    return DigitsCNN(width=8, hidden=32)


DEFENSES = every_defense(width=8, hidden=32, steps=3)


def fit_counting(module, counter: SyncCounter, steps: int = 2) -> int:
    """``steps`` real training steps on digits, counting inside ``training_step`` only; returns how many ran.
    ``module`` is a LightningModule or (module, the callbacks it needs)."""
    module, callbacks = module if isinstance(module, tuple) else (module, [])
    step = module.training_step
    ran = []

    @functools.wraps(step)
    def counted_step(*args, **kwargs):
        ran.append(True)
        with counter.counting():
            return step(*args, **kwargs)

    module.training_step = counted_step
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=steps, limit_val_batches=0,
                         num_sanity_val_steps=0, log_every_n_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, datamodule=Digits(batch_size=32))
    assert trainer.global_step == steps
    return len(ran)


@pytest.mark.parametrize("name", list(DEFENSES))
def test_a_training_step_reads_nothing_back_from_the_device(name, counter):
    torch.manual_seed(0)
    assert fit_counting(DEFENSES[name](), counter) == 2
    assert not counter.counts, f"{name}: host syncs in training_step: {counter.report()}"
    if name.startswith("NuAT"):
        # the loss's nuclear norm on both steps, the attack's on the second: the exemption covers real calls
        assert counter.exempt_calls >= 3
    else:
        assert counter.exempt_calls == 0


@pytest.mark.parametrize("attack", [gama_pgd, gama_fw])
def test_gama_never_reads_a_tensor_value(attack, digits_tensors, counter):
    x, y = digits_tensors[0][:32], digits_tensors[1][:32]
    torch.manual_seed(0)
    net = _network().eval()
    generator = torch.Generator().manual_seed(0)
    # the relaxation weight reaches 0 at step 4 (both objectives run), step sizes drop at 3 and 6, two restarts
    with counter.counting():
        x_adv = attack(net, x, y, 0.1, steps=8, weight_decay_steps=4, step_drops=(3, 6), restarts=2,
                       generator=generator)
    assert not counter.counts, f"{attack.__name__}: host syncs: {counter.report()}"
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(x_adv, x)


def test_the_accuracy_metrics_do_not_validate_their_inputs():
    # validate_args=True runs torch.unique on every update (a sync per metric per step on CUDA) in the torchmetrics
    # releases that always check the targets. 1.9 checks integer predictions only, so with float logits the counting
    # above cannot see validation switched back on; this test does.
    metrics = [m for m in Standard(network=_network()).modules() if isinstance(m, MulticlassAccuracy)]
    assert metrics and not any(m.validate_args for m in metrics)


def test_the_counter_sees_every_kind_of_sync(counter):
    t = torch.tensor([0.0, 1.0, 2.0])
    with counter.counting():
        t.sum().item()
        t.tolist()
        t.cpu()
        t.numpy()
        if t[1] > 0:  # bool()
            pass
        float(t[1])
        int(t[1])
        operator.index(t.long()[1])
        torch.tensor(1.0, device=t.device)
        torch.unique(t)
        t.nonzero()
        t[t > 0]
        torch.equal(t, t)
        torch.zeros(2).repeat_interleave(torch.tensor([1, 2]))
        torch.nn.functional.one_hot(t.long())
        torch.nn.functional.one_hot(t.long(), 3)  # sync-free on CUDA: not counted
    assert set(counter.counts) == {
        "Tensor.item", "Tensor.tolist", "Tensor.cpu", "Tensor.numpy", "Tensor.__bool__", "Tensor.__float__",
        "Tensor.__int__", "Tensor.__index__", "torch.tensor(..., device=...)", "aten._unique2", "aten.nonzero",
        "aten.index with a boolean mask", "aten.equal", "aten.repeat_interleave", "F.one_hot without num_classes"}
    assert all(n == 1 for n in counter.counts.values()), counter.counts
    before = counter.counts.copy()
    t.sum().item()  # not counting: nothing recorded
    assert counter.counts == before
