"""The advtrain command end to end on digits: fit, test, results, TensorBoard, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from cli_utils import advtrain, config, straight_and_resumed

FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def event_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in run_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_fit_then_test_writes_results_and_tensorboard(tmp_path):
    cfg = config("demo/pgd_at.yaml")
    advtrain("fit", "-c", cfg, "--trainer.max_epochs", 2, "--model.init_args.attack.steps", 3, *FAST, cwd=tmp_path)
    run = tmp_path / "runs" / "demo" / "pgd_at" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert list((run / "checkpoints").glob("best-epoch*.ckpt"))
    advtrain("test", "-c", cfg, "--ckpt_path", "best", "--evaluation.limit", 120, *FAST, cwd=tmp_path)
    (result_file,) = run.glob("robustness-best-epoch*.json")  # named by the checkpoint evaluated
    results = json.loads(result_file.read_text())
    assert results["n"] == 120 and results["split"] == "test"
    assert results["checkpoint"].endswith(".ckpt") and "best-epoch" in results["checkpoint"]
    names = [a["name"] for a in results["attacks"]]
    assert names == ["fgsm eps=0.05", "fgsm eps=0.1", "fgsm eps=0.2",
                     "pgd-20x2 eps=0.05", "pgd-20x2 eps=0.1", "pgd-20x2 eps=0.2", "autoattack-standard eps=0.2"]
    clean = results["clean"]["accuracy"]
    assert 0.3 < clean <= 1
    for a in results["attacks"]:
        assert a["n"] == 120 and 0 <= a["accuracy"] <= clean
        assert a["correct"] == sum(results["per_example"][a["name"]])
    pgd_acc = [a["accuracy"] for a in results["attacks"] if a["attack"] == "pgd"]
    assert pgd_acc == sorted(pgd_acc, reverse=True)
    assert results["attacks"][-1]["accuracy"] <= pgd_acc[-1]  # AutoAttack no weaker than PGD at eps 0.2
    assert all(v["passed"] for v in results["sanity"]["verdicts"]), results["sanity"]["verdicts"]
    assert result_file.with_suffix(".md").read_text().startswith("| setting |")
    assert (run / "config_fit.yaml").exists() and (run / "config_test.yaml").exists()
    tags = event_tags(run)
    for tag in ["train/loss", "train/ce_adv", "train/acc_adv_step", "train/acc_clean_epoch", "val/acc_clean",
                "val/acc_robust", "lr-Adam", "robustness/clean", "robustness/pgd-20x2 eps=0.2"]:
        assert tag in tags, (tag, sorted(tags))


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path):
    cfg = config("demo/pgd_at.yaml")
    common = ["--trainer.max_epochs", 3, "--model.init_args.attack.steps", 2, *FAST]
    # SIGKILL in the middle of the second epoch: only the first epoch had finished
    straight, resumed, interrupted = straight_and_resumed(["-c", cfg, *common], 30, tmp_path)
    assert interrupted["epoch"] == 0
    assert resumed["global_step"] == straight["global_step"] and resumed["epoch"] == 2
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


@pytest.mark.parametrize("override,message", [
    (["--evaluation.attacks", '[{"attack": "pgdd", "eps": 0.1}]'], "unknown attack 'pgdd'"),
    (["--evaluation.attacks", '[{"attack": "pgd", "eps": -0.1}]'], "eps must be a finite number >= 0"),
    (["--evaluation.attacks", '[{"attack": "pgd", "eps": 0.1, "steps": 0}]'], "steps must be an integer >= 1"),
    (["--model.init_args.eps", "-1"], "eps must be a finite number >= 0"),
    (["--model.init_args.attack.steps", "0"], "steps must be an integer >= 1"),
    (["--model.init_args.epz", "0.1"], "epz"),
    (["--trainer.max_epochz", "3"], "max_epochz"),
])
def test_bad_input_fails_at_start_with_a_message(tmp_path, override, message):
    proc = advtrain("fit", "-c", config("demo/pgd_at.yaml"), *override, *FAST, cwd=tmp_path, check=False,
                    timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not list(tmp_path.glob("runs/**/*.ckpt"))  # nothing was trained


def test_config_file_typo_fails_at_start(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_epochz: 3\n")
    proc = advtrain("fit", "-c", config("demo/pgd_at.yaml"), "-c", typo, *FAST, cwd=tmp_path, check=False,
                    timeout=120)
    assert proc.returncode != 0 and "max_epochz" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_dataset_fails_at_start_naming_path_and_flag(tmp_path):
    proc = advtrain("fit", "-c", config("mnist/pgd_at.yaml"), "--data.init_args.root", tmp_path / "nowhere",
                    *FAST, cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode != 0
    output = proc.stderr + proc.stdout
    assert str(tmp_path / "nowhere") in output and "download" in output
