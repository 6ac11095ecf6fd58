"""DDP on CPU with 2 gloo processes: fit works, and the sharded evaluation equals one process."""

from __future__ import annotations

import json

import pytest
from cli_utils import advtrain, config

FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", 2, "--trainer.strategy", "ddp"]


def test_ddp_fit_and_sharded_evaluation_equal_one_process(tmp_path):
    cfg = config("demo/pgd_at.yaml")
    advtrain("fit", "-c", cfg, *DDP, "--trainer.max_epochs", 2, "--model.init_args.steps", 3, *FAST, cwd=tmp_path)
    run = tmp_path / "runs" / "demo" / "pgd_at" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    # each rank sees half of each epoch: 2 epochs of ceil(1257 / 64 / 2) steps
    import torch

    assert torch.load(ckpt, weights_only=True)["global_step"] == 2 * 10

    advtrain("test", "-c", cfg, *DDP, "--ckpt_path", ckpt, "--evaluation.filename", "ddp", *FAST, cwd=tmp_path)
    advtrain("test", "-c", cfg, "--ckpt_path", ckpt, "--evaluation.filename", "single", *FAST, cwd=tmp_path)
    ddp = json.loads((run / "ddp-last.json").read_text())
    single = json.loads((run / "single-last.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["n"] == single["n"] == 360
    assert ddp["clean"] == single["clean"]
    assert [(a["name"], a["correct"]) for a in ddp["attacks"]] == [(a["name"], a["correct"]) for a in single["attacks"]]
    assert ddp["per_example"] == single["per_example"]  # example for example
    assert ddp["model_hash"] == single["model_hash"]
    assert 0 < single["attacks"][-1]["correct"] < single["clean"]["correct"]


def test_ddp_evaluation_of_the_table_attacks_equals_one_process(tmp_path):
    """Budget-free DeepFool with its per-example sizes, worst-of-k noise and the multi-targeted attack, sharded
    over 2 processes: counts and sizes equal a one-process evaluation example for example."""
    cfg = config("demo/standard.yaml")
    advtrain("fit", "-c", cfg, "--trainer.max_epochs", 1, *FAST, cwd=tmp_path)
    ckpt = tmp_path / "runs" / "demo" / "standard" / "version_0" / "checkpoints" / "last.ckpt"
    suite = json.dumps([{"attack": "deepfool"}, {"attack": "lrc", "eps": 0.1, "zeta": 2, "samples": 3},
                        {"attack": "pgd_targeted", "eps": 0.1, "steps": 3, "target": "all"}])
    common = ["--ckpt_path", ckpt, "--evaluation.attacks", suite, "--evaluation.limit", 100,
              "--evaluation.batch_size", 25, "--evaluation.sanity_checks", "false", *FAST]
    advtrain("test", "-c", cfg, *DDP, *common, "--evaluation.filename", "ddp", cwd=tmp_path)
    advtrain("test", "-c", cfg, *common, "--evaluation.filename", "single", cwd=tmp_path)
    run = ckpt.parent.parent
    ddp = json.loads((run / "ddp-last.json").read_text())
    single = json.loads((run / "single-last.json").read_text())
    assert ddp["world_size"] == 2 and ddp["per_example"] == single["per_example"]
    # sizes to float precision: a process of a 2-process run uses other thread counts, so convolutions sum in
    # another order (the counts above are exact)
    for name, sizes in single["per_example_metrics"].items():
        for metric, values in sizes.items():
            assert ddp["per_example_metrics"][name][metric] == pytest.approx(values, rel=1e-4, abs=1e-6)
    assert ddp["attacks"][0]["metrics"] == pytest.approx(single["attacks"][0]["metrics"], rel=1e-4)
    assert min(single["per_example_metrics"]["deepfool-50"]["rho"]) > 0  # every example was attacked once
