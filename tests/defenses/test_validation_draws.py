"""Validation and test accuracy of a randomized network are means over draws, with an EOT validation attack."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import DigitsMLP
from torch import nn

from advtrain.datamodules import Digits
from advtrain.defenses import Standard


class Counting(nn.Module):
    """DigitsMLP that counts its forward passes; ``dropout`` > 0 keeps dropout on at test time (randomized)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.inner, self.dropout, self.calls = DigitsMLP(), dropout, 0
        self.head = self.inner.head

    def forward(self, x):
        self.calls += 1
        h = self.inner.body(x)
        return self.head(F.dropout(h, self.dropout, training=True) if self.dropout else h)


def run(stage: str, dropout: float, **kwargs) -> tuple[Standard, dict]:
    torch.manual_seed(0)
    model = Standard(network=Counting(dropout), eps=0.1, val_attack={"steps": 3}, **kwargs)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         inference_mode=False, limit_val_batches=1, limit_test_batches=1)
    data = Digits(batch_size=16)
    metrics = (trainer.validate if stage == "validate" else trainer.test)(model, datamodule=data, verbose=False)[0]
    return model, metrics


@pytest.mark.parametrize("dropout,draws,eot", [(0.0, 1, 1), (0.3, 4, 5)])
def test_validation_forwards_are_draws_and_eot(dropout, draws, eot):
    """probe (2) + clean draws + PGD-3 with EOT (3 x eot) + adversarial draws, on one batch."""
    model, metrics = run("validate", dropout, val_draws=4, val_eot=5)
    assert model.network.calls == 2 + draws + 3 * eot + draws
    assert 0.0 <= metrics["val/acc_robust"] <= 1.0


def test_test_clean_accuracy_is_a_mean_over_draws():
    model, _ = run("test", 0.3, val_draws=6)
    assert model.network.calls == 2 + 6
    model, _ = run("test", 0.0, val_draws=6)
    assert model.network.calls == 2 + 1


def test_randomized_validation_accuracy_is_the_mean_of_the_draws():
    """val/acc_clean equals the accuracy pooled over val_draws forward passes replayed with the same RNG state."""
    torch.manual_seed(0)
    network = Counting(0.5)
    model = Standard(network=network, eps=0.1, val_attack={"steps": 1}, val_draws=7, val_eot=2)
    data = Digits(batch_size=64)
    data.setup("validate")
    torch.manual_seed(123)  # then iterating the loader draws its base seed, as Lightning's loop does
    x, y = data.preprocess(next(iter(data.val_dataloader())), train=False)
    expected = sum((network(x).argmax(1) == y).float().mean() for _ in range(7)) / 7
    single = (network(x).argmax(1) == y).float().mean()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         inference_mode=False, limit_val_batches=1)
    torch.manual_seed(123)
    got = trainer.validate(model, datamodule=data, verbose=False)[0]["val/acc_clean"]
    assert got == pytest.approx(float(expected), abs=1e-6)
    assert got != pytest.approx(float(single), abs=1e-6)  # not one forward pass


def test_validation_eot_needs_an_attack_with_eot():
    with pytest.raises(ValueError, match="val_eot"):
        Standard(network=Counting(), eps=0.1, val_attack="gama_pgd", val_eot=4)
    Standard(network=Counting(), eps=0.1, val_attack="gama_pgd", val_eot=1)
