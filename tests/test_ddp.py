"""DDP on CPU with 2 gloo processes: fit works, and the sharded evaluation equals one process."""

from __future__ import annotations

import json

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
    ddp = json.loads((run / "ddp.json").read_text())
    single = json.loads((run / "single.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["n"] == single["n"] == 360
    assert ddp["clean"] == single["clean"]
    assert [(a["name"], a["correct"]) for a in ddp["attacks"]] == [(a["name"], a["correct"]) for a in single["attacks"]]
    assert ddp["per_example"] == single["per_example"]  # example for example
    assert ddp["model_hash"] == single["model_hash"]
    assert 0 < single["attacks"][-1]["correct"] < single["clean"]["correct"]
