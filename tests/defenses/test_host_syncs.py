"""No host-device sync inside a training step, counted on CPU so that a regression shows without a GPU.

docs/design.md ("Performance principles"): nothing in a training step may call .item(), .cpu() or branch on a tensor
value; NuAT's SVD is the one known host sync. On a GPU, ``make test-gpu`` checks this with
``torch.cuda.set_sync_debug_mode("error")`` (tests/integration/test_gpu.py). A CPU never waits for itself, so here the
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

import pytest
import pytorch_lightning as pl
import torch
from helpers import every_defense
from sync_counter import SyncCounter
from torchmetrics.classification import MulticlassAccuracy

from advtrain.attacks import gama_fw, gama_pgd
from advtrain.datamodules import Digits
from advtrain.defenses import Standard
from advtrain.networks import DigitsCNN


# reads of a tensor's value from Python
def _network() -> DigitsCNN:
    return DigitsCNN(width=8, hidden=32)


DEFENSES = every_defense(width=8, hidden=32, steps=3)


def fit_counting(module, counter: SyncCounter, steps: int = 2) -> int:
    """``steps`` real training steps on digits, counting inside ``training_step`` and the callbacks'
    ``on_train_batch_end`` (weight averages and the covariance tracker update there, every step); returns how many
    steps ran. ``module`` is a LightningModule or (module, the callbacks it needs)."""
    module, callbacks = module if isinstance(module, tuple) else (module, [])
    ran = []

    def counted(hook, record=False):
        @functools.wraps(hook)
        def run(*args, **kwargs):
            if record:
                ran.append(True)
            with counter.counting():
                return hook(*args, **kwargs)

        return run

    module.training_step = counted(module.training_step, record=True)
    for callback in callbacks:
        callback.on_train_batch_end = counted(callback.on_train_batch_end)
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
