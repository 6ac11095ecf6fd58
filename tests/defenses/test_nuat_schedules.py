"""The NuAT configs' lambda and learning-rate schedules against the official scripts (val-iisc/NuAT, CIFAR10/).

The expected values are computed here from the scripts' rules, as their training loops apply them: lambda starts at
0 and grows after each epoch; torch's CyclicLR (0 -> max, default momentum cycle 0.9 -> 0.8 -> 0.9) is stepped after
every batch, in NuAT_cifar10.py and NuAT2_WRN_cifar10.py only in the first lr_up + lr_down epochs, after which
the script divides the lr it last saw by 10 at the end of epochs lr_up + lr_down + 5 and + 10. The configs are
built as training builds them: parsed by the CLI, then the model's own configure_optimizers, stepped batch by batch.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from cli_utils import ROOT
from helpers import DigitsMLP

from advtrain.cli import AdvtrainCLI
from advtrain.datamodules import Digits
from advtrain.defenses import CyclicLRInEpochs, NuAT


@dataclass(frozen=True, eq=False)
class Script:
    """One official script's schedule rules (epochs counted from 0)."""

    name: str
    epochs: int
    lambda_max: float
    lambda_epochs: int  # after each epoch < lambda_epochs the script adds lambda_max / lambda_epochs
    lr_max: float = 0.1
    lr_up: int = 0  # CyclicLR step_size_up, in epochs (0: no CyclicLR, constant lr_max)
    lr_down: int = 0  # CyclicLR step_size_down, in epochs
    stepped_epochs: int | None = None  # CyclicLR is stepped only in epochs < this (None: always)
    divide_after: tuple[int, ...] | None = None  # lr / 10 at the end of these epochs (None: stepped + 5, + 10)
    attack_steps: dict[int, int] = field(default_factory=dict)  # epoch -> steps, from that epoch on
    nuclear_every: dict[int, int] = field(default_factory=dict)  # epoch -> nuclear term every n-th batch


NUAT = Script("NuAT_cifar10.py", 100, 4.5, 90, lr_up=40, lr_down=50, stepped_epochs=80,
              attack_steps={0: 1}, nuclear_every={0: 2})
NUAT_WA = Script("NuAT_WA_cifar10.py", 100, 4.0, 100, lr_up=25, lr_down=75, attack_steps={0: 1}, nuclear_every={0: 2})
NUAT2_WRN = Script("NuAT2_WRN_cifar10.py", 55, 4.0, 55, lr_up=20, lr_down=20, stepped_epochs=35,
                   attack_steps={0: 2}, nuclear_every={0: 1})
NUAT2_WA = Script("NuAT2-WA_WRN_cifar10.py", 80, 4.0, 80, lr_up=20, lr_down=60, attack_steps={0: 2},
                  nuclear_every={0: 1})
# no official script: NuAT-H is NuAT (single step, alternate batches) then NuAT2 (two steps, every batch) with
# NuAT2_WRN_cifar10.py's schedules; ImageNet-100 stretches NuAT_WA_cifar10.py's to 120 epochs; MNIST has NuAT-WA's
# lambda rule and the paper's constant lr 0.01
NUAT_H = Script("NuAT-H: NuAT2_WRN_cifar10.py's schedules", 55, 4.0, 55, lr_up=20, lr_down=20, stepped_epochs=35,
                attack_steps={0: 1, 50: 2}, nuclear_every={0: 2, 50: 1})
IMAGENET = Script("NuAT_WA_cifar10.py's, stretched to 120 epochs", 120, 4.0, 120, lr_up=30, lr_down=90,
                  attack_steps={0: 1}, nuclear_every={0: 2})
MNIST = Script("no script: NuAT-WA's lambda rule, constant lr", 50, 4.0, 50, lr_max=0.01, attack_steps={0: 1},
               nuclear_every={0: 2})


def cyclic(script: Script, it: float, steps: int) -> tuple[float, float]:
    """lr and momentum after `it` steps of CyclicLR(base_lr=0, max_lr, up, down), torch's default momentum cycle."""
    up, down = script.lr_up * steps, script.lr_down * steps
    assert 0 <= it <= up + down, "the official scripts never start a second cycle"
    scale = it / up if it <= up else (up + down - it) / down
    return script.lr_max * scale, 0.9 - (0.9 - 0.8) * scale


def official(script: Script, steps: int) -> list[tuple[int, int, float, float, float]]:
    """(epoch, batch, lambda, lr, momentum) of every batch, as the script's training loop sets them."""
    rows, lam, it, lr_set_by_script = [], 0.0, 0, None
    divide_after = script.divide_after
    if divide_after is None and script.stepped_epochs is not None:  # if (epoch - lr_up - lr_down) in [5, 10]
        divide_after = (script.stepped_epochs + 5, script.stepped_epochs + 10)
    for epoch in range(script.epochs):
        for batch in range(steps):
            if not script.lr_up:
                lr, momentum = script.lr_max, 0.9
            else:
                lr, momentum = cyclic(script, it, steps)
                lr = lr if lr_set_by_script is None else lr_set_by_script
            rows.append((epoch, batch, lam, lr, momentum))
            if script.lr_up and (script.stepped_epochs is None or epoch < script.stepped_epochs):
                it += 1  # optimizer.step(); scheduler.step()
        if script.stepped_epochs is not None and epoch in divide_after:
            last_lr = cyclic(script, it, steps)[0] if lr_set_by_script is None else lr_set_by_script
            lr_set_by_script = last_lr / 10.0  # LR /= lr_factor; param_group['lr'] = LR
        if epoch < script.lambda_epochs:
            lam += script.lambda_max / script.lambda_epochs  # Nuc_reg += Nuc_max / ...
    return rows


def at_epoch(table: dict[int, int], epoch: int) -> int:
    return table[max(e for e in table if e <= epoch)]


# (lambda, lr) of the first batch of the epochs that cross each breakpoint, written out from the scripts
SPOT = {
    NUAT: {0: (0, 0), 39: (1.95, 0.0975), 40: (2.0, 0.1), 79: (3.95, 0.022), 80: (4.0, 0.02), 85: (4.25, 0.02),
           86: (4.3, 0.002), 90: (4.5, 0.002), 91: (4.5, 0.0002), 99: (4.5, 0.0002)},
    NUAT_WA: {0: (0, 0), 24: (0.96, 0.096), 25: (1.0, 0.1), 26: (1.04, 0.1 * 74 / 75), 50: (2.0, 0.1 * 50 / 75),
              99: (3.96, 0.1 / 75)},
    NUAT2_WRN: {0: (0, 0), 19: (4 * 19 / 55, 0.095), 20: (4 * 20 / 55, 0.1), 34: (4 * 34 / 55, 0.03),
                35: (4 * 35 / 55, 0.025), 40: (4 * 40 / 55, 0.025), 41: (4 * 41 / 55, 0.0025),
                45: (4 * 45 / 55, 0.0025), 46: (4 * 46 / 55, 0.00025), 54: (4 * 54 / 55, 0.00025)},
    NUAT2_WA: {0: (0, 0), 19: (0.95, 0.095), 20: (1.0, 0.1), 21: (1.05, 0.1 * 59 / 60), 79: (3.95, 0.1 / 60)},
    IMAGENET: {0: (0, 0), 29: (4 * 29 / 120, 0.1 * 29 / 30), 30: (1.0, 0.1), 119: (4 * 119 / 120, 0.1 / 90)},
    MNIST: {0: (0, 0.01), 25: (2.0, 0.01), 49: (3.92, 0.01)},
}
SPOT[NUAT_H] = SPOT[NUAT2_WRN]

CONFIGS = {
    "cifar10/nuat": (NUAT, ["--data.init_args.download=true"]),
    "cifar10/nuat_wa": (NUAT_WA, ["--data.init_args.download=true"]),
    "cifar10/nuat2_wrn": (NUAT2_WRN, ["--data.init_args.download=true"]),
    "cifar10/nuat2_wa_wrn": (NUAT2_WA, ["--data.init_args.download=true"]),
    "cifar10/nuat_h": (NUAT_H, ["--data.init_args.download=true"]),
    "imagenet100/nuat_wa": (IMAGENET, []),
    "mnist/nuat": (MNIST, ["--data.init_args.download=true"]),
}


def build(name, *overrides):
    """The config's model, as ``advtrain fit -c`` builds it (nothing is read or written; run in a scratch folder)."""
    for split in ("train", "val"):  # ImageNet-100 checks that its folders exist
        Path("data/imagenet", split).mkdir(parents=True, exist_ok=True)
    args = ["-c", str(ROOT / "configs" / f"{name}.yaml"), "--trainer.logger=false", "--trainer.accelerator=cpu",
            *CONFIGS[name][1], *overrides]
    cli = AdvtrainCLI(args=args, run=False)
    return cli.model, cli.trainer.max_epochs


def trained_schedule(model, max_epochs, steps):
    """(epoch, batch, lambda, lr, momentum) of every batch, from the optimizer and scheduler the model's
    configure_optimizers returns, stepped as Lightning steps them; the attack's steps and nuclear_every per epoch."""
    fake = SimpleNamespace(max_epochs=max_epochs, estimated_stepping_batches=max_epochs * steps, current_epoch=0)
    model.trainer = fake
    configured = model.configure_optimizers()
    if isinstance(configured, dict):
        optimizer, config = configured["optimizer"], configured["lr_scheduler"]
        assert config["interval"] == "step"
        scheduler = config["scheduler"]
    else:
        optimizer, scheduler = configured, None
    rows, attack = [], {}
    for epoch in range(max_epochs):
        fake.current_epoch = epoch
        attack[epoch] = (model.steps_this_epoch(), model.nuclear_every_this_epoch())
        lam = model.current_lambda()
        assert type(lam) is float
        for batch in range(steps):
            group = optimizer.param_groups[0]
            rows.append((epoch, batch, lam, group["lr"], group["momentum"]))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    return rows, attack


def assert_same_schedule(ours, expected):
    got, want = np.array(ours, dtype=np.float64), np.array(expected, dtype=np.float64)
    assert got.shape == want.shape and np.array_equal(got[:, :2], want[:, :2])
    wrong = ~np.isclose(got[:, 2:], want[:, 2:], rtol=1e-9, atol=1e-12).all(axis=1)
    if wrong.any():
        i = int(np.argmax(wrong))
        raise AssertionError(f"{wrong.sum()} batches differ; first: epoch {ours[i][0]} batch {ours[i][1]}: "
                             f"(lambda, lr, momentum) {ours[i][2:]} != official {expected[i][2:]}")


@pytest.mark.parametrize("name,steps", [(name, 3) for name in CONFIGS] + [("cifar10/nuat", 766)])
def test_config_follows_its_official_script_batch_by_batch(name, steps, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["advtrain"])
    script = CONFIGS[name][0]
    model, max_epochs = build(name)
    assert max_epochs == script.epochs
    ours, attack = trained_schedule(model, max_epochs, steps)
    expected = official(script, steps)
    assert_same_schedule(ours, expected)
    # the official values at the breakpoints, written out, check the rules above as much as the config
    for epoch, (lam, lr) in SPOT[script].items():
        (row,) = [r for r in expected if r[:2] == (epoch, 0)]
        assert row[2:4] == pytest.approx((lam, lr), rel=1e-9, abs=1e-12), f"official rule, epoch {epoch}"
    for epoch, (attack_steps, every) in attack.items():
        assert (attack_steps, every) == (at_epoch(script.attack_steps, epoch), at_epoch(script.nuclear_every, epoch))


@pytest.mark.parametrize("override", [
    "--model.init_args.lambda_ramp_epochs=100",  # lambda would reach only 4.455 (the old config)
    "--model.init_args.lr_scheduler.init_args.milestones=[85, 90]",  # /10 one epoch early
    "--model.init_args.lr_scheduler.init_args.stop_epoch=79",
    "--model.init_args.lr_scheduler.init_args.down_epochs=40",
    "--model.init_args.lr_scheduler.init_args.cycle_momentum=false",
])
def test_the_comparison_catches_a_wrong_schedule(override, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["advtrain"])
    model, max_epochs = build("cifar10/nuat", override)
    ours, _ = trained_schedule(model, max_epochs, 2)
    with pytest.raises(AssertionError):
        assert_same_schedule(ours, official(NUAT, 2))


def test_cyclic_lr_in_epochs_needs_its_batches_per_epoch_and_sane_epochs():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    untold = CyclicLRInEpochs(opt, max_lr=0.1, up_epochs=1, down_epochs=1)
    with pytest.raises(RuntimeError, match="configure_optimizers"):
        untold.step()
    untold.set_steps_per_epoch(4)
    assert untold.steps_per_epoch == 4 and untold.get_last_lr() == [0.0]  # the cycle's first lr is set at once
    with pytest.raises(ValueError, match="stop_epoch"):
        CyclicLRInEpochs(opt, max_lr=0.1, up_epochs=1, down_epochs=1, milestones=[3], steps_per_epoch=2)
    with pytest.raises(ValueError, match="stop_epoch"):
        CyclicLRInEpochs(opt, max_lr=0.1, up_epochs=1, down_epochs=1, stop_epoch=3, milestones=[3], steps_per_epoch=2)


class RecordLR(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        group = trainer.optimizers[0].param_groups[0]
        self.rows.append((trainer.current_epoch, batch_idx, pl_module.current_lambda(), group["lr"],
                          group["momentum"]))


class StopAfterEpoch(pl.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def small_nuat():
    torch.manual_seed(0)
    # NuAT_cifar10.py's schedule shrunk to 6 epochs: up 2, down slope 3, stepped in epochs 0-3, /10 from 5
    return NuAT(network=DigitsMLP(), eps=0.1, val_attack={"steps": 1}, lambda_max=3.0, lambda_ramp_epochs=4,
                optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
                lr_scheduler=lambda o: CyclicLRInEpochs(o, max_lr=0.1, up_epochs=2, down_epochs=3, stop_epoch=4,
                                                         milestones=[5]))


def fit(model, tmp_path, *callbacks, ckpt_path=None, logger=False):
    trainer = pl.Trainer(max_epochs=6, accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, inference_mode=False,
                         limit_train_batches=3, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
                         callbacks=list(callbacks))
    trainer.fit(model, datamodule=Digits(), ckpt_path=ckpt_path)
    return trainer


def test_lightning_steps_it_every_batch_and_a_resumed_run_continues_it_exactly(tmp_path):
    script = Script("shrunk NuAT_cifar10.py", 6, 3.0, 4, lr_up=2, lr_down=3, stepped_epochs=4, divide_after=(4,))
    straight = RecordLR()
    fit(small_nuat(), tmp_path, straight)
    assert_same_schedule(straight.rows, official(script, 3))

    first, second = RecordLR(), RecordLR()
    trainer = fit(small_nuat(), tmp_path, first, StopAfterEpoch(4))  # stops inside the frozen epochs
    trainer.save_checkpoint(tmp_path / "stopped.ckpt")
    checkpoint = torch.load(tmp_path / "stopped.ckpt", weights_only=True)  # plain data only
    assert checkpoint["lr_schedulers"][0]["_milestones"] == [13]  # CyclicLR steps 0-12, 12 = epoch 4's lr
    resumed = small_nuat()
    fit(resumed, tmp_path, second, ckpt_path=tmp_path / "stopped.ckpt")
    assert first.rows + second.rows == straight.rows
    # epoch 5: the lr CyclicLR reached at its last step (12 of 6 up + 9 down: 0.1 / 3), divided by 10
    assert second.rows[0][0] == 5 and second.rows[0][3] == pytest.approx(0.1 / 3 / 10)


def test_lambda_is_logged_as_a_cpu_tensor_and_reaches_tensorboard(tmp_path, batch):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = small_nuat()
    model.trainer = SimpleNamespace(max_epochs=6, current_epoch=1)
    out = model.defense_loss(*batch, 0)
    assert out.parts["lambda"].device.type == "cpu" and float(out.parts["lambda"]) == 0.75
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(small_nuat(), tmp_path, StopAfterEpoch(1), logger=logger)
    events = EventAccumulator(str(logger.log_dir))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/lambda")]
    assert [v for _, v in logged] == [0.0] * 3 + [0.75] * 3  # 3 batches of epoch 0, 3 of epoch 1
    assert math.isclose(logged[-1][1], 0.75)
