"""The official AutoAttack checks (fra31/auto-attack, autoattack/checks.py) as sanity verdicts. Each fires on a model
built to trigger it and stays silent on trained digits models: the model checks on the measurements of
``autoattack_checks.probe``, the stage checks (zero gradients, Square's success) end to end through
RobustnessEvaluation, where the verdicts reach the results file, robustness.md and a logged warning."""

from __future__ import annotations

import json
import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.callbacks import RobustnessEvaluation
from advtrain.datamodules import Digits
from advtrain.defenses import Standard
from advtrain.evaluation import Accuracy, SettingResult
from advtrain.evaluation.autoattack_checks import CHECKS, probe
from advtrain.evaluation.sanity import Measured

MODEL_CHECKS = ("autoattack_randomized", "autoattack_range_output", "autoattack_dynamic", "autoattack_n_classes")


class Built(nn.Module):
    """A trained digits classifier, changed so that one official check fires:

    * ``quantized``: reads its input rounded to the 8-bit grid (no input gradient anywhere);
    * ``softmax``: returns probabilities;
    * ``dropout``: drops half of each input at random in every forward pass, eval mode or not;
    * ``purifying``: moves its input one small step down its own entropy's gradient before classifying it (a
      test-time defense that calls ``torch.autograd.grad`` in its forward pass);
    * ``three_classes``: keeps three logits.
    """

    num_classes = 10

    def __init__(self, classifier: nn.Module, kind: str = "plain"):
        super().__init__()
        self.classifier, self.kind = classifier, kind
        if kind == "three_classes":
            self.num_classes = 3

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "quantized":
            return self.classifier(torch.round(x * 255) / 255)
        if self.kind == "dropout":
            return self.classifier(F.dropout(x, 0.5, training=True))
        if self.kind == "purifying":
            with torch.enable_grad():
                probe_x = x.detach().requires_grad_(True)
                entropy = -(self.classifier(probe_x).softmax(1) * self.classifier(probe_x).log_softmax(1)).sum()
                (gradient,) = torch.autograd.grad(entropy, probe_x)
            return self.classifier(x - 0.01 * gradient.sign())
        logits = self.classifier(x)
        if self.kind == "softmax":
            return logits.softmax(1)
        return logits[:, :3] if self.kind == "three_classes" else logits


def model_verdicts(network: nn.Module, x: Tensor, y: Tensor, version: str) -> dict:
    """The AutoAttack verdicts of a suite with one AutoAttack setting of ``version``, from the probe."""
    setting = SettingResult({"attack": "autoattack", "version": version, "eps": 0.1}, f"autoattack-{version}",
                            Accuracy.counted(0, len(y)))
    measured = Measured(clean=1.0, attacks=[setting], autoattack=probe(network, x, y, seed=0))
    return {v.check: v for check in CHECKS for v in check(measured) if v.check in MODEL_CHECKS}


@pytest.mark.parametrize("kind, check, version", [
    ("dropout", "autoattack_randomized", "standard"), ("softmax", "autoattack_range_output", "standard"),
    ("purifying", "autoattack_dynamic", "standard"), ("three_classes", "autoattack_n_classes", "rand")])
def test_each_model_check_fires_on_the_model_built_for_it_and_only_that_one(trained_mlp, batch, kind, check,
                                                                            version):
    x, y = batch
    y = y % 3 if kind == "three_classes" else y
    verdicts = model_verdicts(Built(trained_mlp, kind), x, y, version)
    assert not verdicts[check].passed, verdicts[check]
    assert verdicts[check].likely_cause
    assert all(v.passed for name, v in verdicts.items() if name != check), verdicts


@pytest.mark.parametrize("version", ["standard", "rand"])
def test_model_checks_are_silent_on_a_trained_digits_model(trained_mlp, batch, version):
    verdicts = model_verdicts(Built(trained_mlp), *batch, version)
    assert all(v.passed for v in verdicts.values()), verdicts
    # the official code checks for randomness only before version standard
    assert ("autoattack_randomized" in verdicts) == (version == "standard")
    assert set(verdicts) >= {"autoattack_range_output", "autoattack_dynamic", "autoattack_n_classes"}


def test_the_dynamic_check_puts_back_the_tracer_it_found(trained_mlp, batch):
    def tracer(frame, event, arg):
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        calls = probe(Built(trained_mlp, "purifying"), *batch, seed=0)["calls_in_forward"]
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)
    assert calls["grad"] >= 1


def evaluate(tmp_path, network: nn.Module, eps: float = 0.1) -> tuple[dict, str]:
    """AutoAttack standard on the first 24 test digits (two batches); the results file and .md."""
    evaluation = RobustnessEvaluation(attacks=[{"attack": "autoattack", "eps": eps}], batch_size=12, limit=24)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         inference_mode=False, default_root_dir=tmp_path, callbacks=[evaluation])
    trainer.test(Standard(network=network, eps=0.1), datamodule=Digits(), verbose=False)
    path = evaluation.results_path
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_zero_gradients_and_square_fire_on_a_quantized_model_in_every_output(tmp_path, trained_mlp):
    with pytest.warns(UserWarning, match="sanity check autoattack_square_sr.* failed") as caught:
        results, markdown = evaluate(tmp_path, Built(trained_mlp, "quantized"))
    messages = [str(w.message) for w in caught]
    assert any("autoattack_zero_gradients" in m and "gradient masking" in m for m in messages)
    (entry,) = results["attacks"]
    record = entry["autoattack"]  # summed over the two batches
    assert record["clean_correct"] == results["clean"]["correct"] == 24
    assert record["zero_gradient"] == record["robust_after"]["apgd-ce"]  # every point APGD-T starts on
    broken_by_square = record["robust_after"]["fab-t"] - record["robust_after"]["square"]
    assert broken_by_square / 24 > 0.002 and record["robust_after"]["square"] == entry["correct"]
    verdicts = {v["check"].split("[")[0]: v for v in results["sanity"]["verdicts"]}
    assert not verdicts["autoattack_zero_gradients"]["passed"] and not verdicts["autoattack_square_sr"]["passed"]
    assert f"Square broke {broken_by_square} of 24" in verdicts["autoattack_square_sr"]["detail"]
    assert all(verdicts[name]["passed"] for name in MODEL_CHECKS)
    assert "FAILED: autoattack_square_sr" in markdown and "FAILED: autoattack_zero_gradients" in markdown


# eps 0.1 leaves the trained MLP points that Square attacks too; at eps 0.3 APGD-CE breaks every point, quickly
@pytest.mark.parametrize("kind, eps", [("plain", 0.1), ("softmax", 0.3)])
def test_through_the_evaluation_a_digits_model_passes_and_a_probability_model_fails(tmp_path, trained_mlp, kind,
                                                                                    eps):
    results, markdown = evaluate(tmp_path, Built(trained_mlp, kind), eps)
    verdicts = {v["check"].split("[")[0]: v for v in results["sanity"]["verdicts"]}
    assert set(verdicts) >= {*MODEL_CHECKS, "autoattack_zero_gradients"}
    assert ("autoattack_square_sr" in verdicts) == (kind == "plain")  # Square ran on the points left
    failed = {name for name, v in verdicts.items() if not v["passed"] and name.startswith("autoattack")}
    assert failed == (set() if kind == "plain" else {"autoattack_range_output"})
    assert ("FAILED: autoattack_range_output" in markdown) == (kind == "softmax")


def test_the_probe_of_a_randomized_model_is_seeded_and_leaves_the_global_rng_alone(trained_mlp, batch):
    network = Built(trained_mlp, "dropout")
    state = torch.get_rng_state()
    first, second = (probe(network, *batch, seed=3) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert first == second and len(set(first["correct_per_pass"])) > 1
