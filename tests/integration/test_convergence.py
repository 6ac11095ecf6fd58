"""Convergence checks (make test-slow): the demo recipes train to the robustness they should."""

from __future__ import annotations

import pytest
from cli_utils import ROOT

from advtrain.callbacks import RobustnessEvaluation
from advtrain.cli import AdvtrainCLI

pytestmark = pytest.mark.slow
QUIET = ["--trainer.enable_progress_bar=false"]


def train_and_evaluate(name):
    cfg = str(ROOT / "configs" / "demo" / f"{name}.yaml")
    fit = AdvtrainCLI(args=["fit", "-c", cfg, *QUIET])
    test = AdvtrainCLI(args=["test", "-c", cfg, "--ckpt_path", fit.trainer.checkpoint_callback.best_model_path,
                             *QUIET])
    results = next(cb.results.to_dict() for cb in test.trainer.callbacks if isinstance(cb, RobustnessEvaluation))
    return results["clean"]["accuracy"], {a["name"]: a["accuracy"] for a in results["attacks"]}


def test_adversarial_training_beats_standard_training_under_pgd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clean_std, robust_std = train_and_evaluate("standard")
    clean_at, robust_at = train_and_evaluate("pgd_at")
    clean_nuat, robust_nuat = train_and_evaluate("nuat")
    strong = "pgd-20x2 eps=0.2"
    assert clean_std > 0.95 and clean_at > 0.85 and clean_nuat > 0.85
    assert robust_std[strong] < 0.15
    assert robust_at[strong] > robust_std[strong] + 0.3
    assert robust_nuat[strong] > robust_std[strong] + 0.3


def test_the_tensorized_demo_trains_and_eot_is_at_least_as_strong(tmp_path, monkeypatch):
    """theta = 0.9 trained from scratch still learns digits; EOT-PGD is not weaker than single-draw PGD (within
    the noise of a mean over 10 draws x 360 examples)."""
    monkeypatch.chdir(tmp_path)
    clean, robust = train_and_evaluate("tensorized")
    assert clean > 0.9
    for eps in ("0.05", "0.1"):
        assert robust[f"pgd-20 eot10 eps={eps}"] <= robust[f"pgd-20 eps={eps}"] + 0.02
        assert robust[f"pgd-20 eps={eps}"] < clean
