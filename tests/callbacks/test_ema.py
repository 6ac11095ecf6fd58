"""advtrain.callbacks.EMA: the average against a hand computation, where it is used, and exact resume."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from cli_utils import config, straight_and_resumed
from torch import nn

from advtrain.callbacks import EMA
from advtrain.datamodules import Digits
from advtrain.defenses import Standard


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x))


class Recorder(pl.Callback):
    """Keeps the raw weights after every optimizer step, and the weights seen during validation."""

    def __init__(self):
        self.raw, self.validated = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.raw.append(copy.deepcopy(pl_module.network.state_dict()))

    def on_validation_epoch_start(self, trainer, pl_module):
        self.validated.append(copy.deepcopy(pl_module.network.state_dict()))


def hand_ema(states, decay):
    """AveragedModel semantics: the first update copies, then omega = decay omega + (1 - decay) theta."""
    average = {k: v.clone().float() for k, v in states[0].items()}
    for state in states[1:]:
        for k, v in state.items():
            if v.is_floating_point():
                average[k] = decay * average[k] + (1 - decay) * v
            else:
                average[k] = v.clone().float()
    return average


def fit(tmp_path, callbacks, **kwargs):
    torch.manual_seed(0)
    model = Standard(network=SmallNet(), eps=0.1, val_attack={"steps": 2})
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, inference_mode=False, limit_train_batches=7,
                         limit_val_batches=2, num_sanity_val_steps=0, callbacks=callbacks, **kwargs)
    trainer.fit(model, datamodule=Digits())
    return model, trainer


def test_ema_weights_equal_a_hand_computed_average_and_are_validated(tmp_path):
    ema, recorder = EMA(decay=0.8), Recorder()
    model, trainer = fit(tmp_path, [ema, recorder])
    expected = hand_ema(recorder.raw, 0.8)
    averaged = ema._average_model.module.network.state_dict()
    # when training ends WeightAveraging copies the average into the module
    for key, value in expected.items():
        if value.is_floating_point() and "num_batches" not in key:
            torch.testing.assert_close(averaged[key].float(), value, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model.network.state_dict()[key].float(), value, rtol=1e-5, atol=1e-6)
    # validation ran on the average (hand-computed at that point), not on the raw weights
    validated = recorder.validated[-1]
    raw_last = recorder.raw[-1]
    assert not torch.allclose(validated["head.weight"], raw_last["head.weight"])
    torch.testing.assert_close(validated["head.weight"], expected["head.weight"], rtol=1e-5, atol=1e-6)
    # raw-network validation is logged next to the averaged one
    assert {"val/acc_robust", "val/acc_robust_raw", "val/acc_clean_raw"} <= set(trainer.callback_metrics)


def test_start_step_delays_the_average(tmp_path):
    ema, recorder = EMA(decay=0.8, start_step=3), Recorder()
    fit(tmp_path, [ema, recorder])
    expected = hand_ema(recorder.raw[3:], 0.8)
    torch.testing.assert_close(ema._average_model.module.network.state_dict()["head.weight"],
                               expected["head.weight"], rtol=1e-5, atol=1e-6)


def test_checkpoint_holds_the_average_and_test_uses_it(tmp_path):
    ema, recorder = EMA(decay=0.8), Recorder()
    _, trainer = fit(tmp_path, [ema, recorder], enable_checkpointing=True)
    ckpt = trainer.checkpoint_callback.best_model_path
    state = torch.load(ckpt, weights_only=True)
    expected = hand_ema(recorder.raw, 0.8)
    torch.testing.assert_close(state["state_dict"]["network.head.weight"], expected["head.weight"], rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(state["current_model_state"]["network.head.weight"], recorder.raw[-1]["head.weight"])
    fresh = Standard(network=SmallNet(), eps=0.1)
    tester = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False,
                        limit_test_batches=1, callbacks=[EMA(decay=0.8)])
    tester.test(fresh, datamodule=Digits(), ckpt_path=ckpt, verbose=False)
    torch.testing.assert_close(fresh.network.head.weight, expected["head.weight"], rtol=1e-5, atol=1e-6)


def test_bad_decay_is_rejected():
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.5)


def test_resume_gives_bitwise_the_same_averages_as_an_uninterrupted_run(tmp_path):
    """NuAT2-WA on digits with both averages; SIGKILL in the second epoch, resume with --ckpt_path last."""
    overrides = tmp_path / "wa.yaml"
    overrides.write_text(
        "trainer:\n  max_epochs: 3\n  callbacks:\n    - class_path: advtrain.callbacks.EMA\n"
        "      init_args: {decay: 0.9, attack_decay: 0.5}\n"
        "model:\n  init_args:\n    attack_steps: 2\n    attack_on_ema: true\n")
    cfg = config("demo/nuat.yaml")
    fast = ["--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", 2]
    a, b, _ = straight_and_resumed(["-c", cfg, "-c", overrides, *fast], 30, tmp_path)
    assert a["global_step"] == b["global_step"] == 60
    for part in ("state_dict", "current_model_state", "averaging_state"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    (fast_a,) = [v["attack_model"] for k, v in a["callbacks"].items() if k.startswith("EMA")]
    (fast_b,) = [v["attack_model"] for k, v in b["callbacks"].items() if k.startswith("EMA")]
    for key, value in fast_a.items():
        assert torch.equal(value, fast_b[key]), key


def test_the_sync_free_average_is_torchs_bitwise_also_after_a_load():
    """HostCountedAverage updates as torch's AveragedModel does (its avg_fn path), without reading n_averaged
    back; loaded from a state dict it continues where the other left off."""
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    from advtrain.callbacks.ema import HostCountedAverage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ours, theirs = (cls(model, use_buffers=True, avg_fn=get_ema_avg_fn(0.9))
                    for cls in (HostCountedAverage, AveragedModel))
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 4))  # moves BatchNorm's running statistics (buffers are averaged too)
        ours.update_parameters(model)
        theirs.update_parameters(model)
        if step == 1:
            resumed = HostCountedAverage(model, use_buffers=True, avg_fn=get_ema_avg_fn(0.9))
            resumed.load_state_dict(ours.state_dict())
            ours = resumed
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
