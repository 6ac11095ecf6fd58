"""The step-cost benchmark runs and measures what it says (timing thresholds are for bench/, not CI)."""

from __future__ import annotations

import importlib.util
import json

from cli_utils import ROOT


def test_step_cost_benchmark_runs_and_writes_its_ratios(tmp_path):
    spec = importlib.util.spec_from_file_location("step_cost", ROOT / "bench" / "step_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "cost.json"
    result = module.main(["--batch-size", "4", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["ratios"] == result["ratios"]
    # ten attack iterations cost clearly more than a clean step, a single FGSM-RS step much less than PGD-10
    assert result["ratios"]["pgd10_vs_clean"] > 3
    assert result["ratios"]["fgsm_rs_vs_clean"] < result["ratios"]["pgd10_vs_clean"]
