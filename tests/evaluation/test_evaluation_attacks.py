"""Every attack of the table runs from an evaluation suite and reaches robustness.json, robustness.md,
TensorBoard and advtrain report; wrong parameters fail when the config is read; BPDA through the evaluation."""

from __future__ import annotations

import json
import statistics

import pytest
import pytorch_lightning as pl
import torch
from cli_utils import advtrain, config
from helpers import DigitsMLP
from pytorch_lightning.loggers import TensorBoardLogger

from advtrain import report
from advtrain.attacks import AttackSetting
from advtrain.callbacks import RobustnessEvaluation
from advtrain.datamodules import Digits
from advtrain.defenses import Standard
from advtrain.networks import FeatureSqueezing

SUITE = [{"attack": "deepfool"}, {"attack": "pgd", "eps": 0.1, "steps": 10},
         {"attack": "pgd_targeted", "eps": 0.1, "steps": 10, "target": "all"},
         {"attack": "pgd_targeted", "eps": 0.1, "steps": 10}, {"attack": "rfgsm", "eps": 0.1},
         {"attack": "uniform_noise", "eps": [0.1, 0.3]}, {"attack": "lrc", "eps": [0.1, 0.3], "zeta": 2, "samples": 5}]
NAMES = ["deepfool-50", "pgd-10 eps=0.1", "pgd_targeted-10 target=all eps=0.1", "pgd_targeted-10 target=random eps=0.1",
         "rfgsm eps=0.1", "uniform_noise eps=0.1", "uniform_noise eps=0.3", "lrc zeta=2 samples=5 eps=0.1",
         "lrc zeta=2 samples=5 eps=0.3"]


def train(network, epochs=6):
    torch.manual_seed(0)
    model = Standard(network=network, eps=0.1, val_attack={"steps": 1},
                     optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
               enable_checkpointing=False, enable_model_summary=False, inference_mode=False,
               limit_val_batches=0).fit(model, datamodule=Digits())
    return model


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = train(DigitsMLP(hidden=64))
    evaluation = RobustnessEvaluation(attacks=SUITE, limit=60, batch_size=32)
    logger = TensorBoardLogger(root, name="digits", version=0)
    pl.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False,
               inference_mode=False, callbacks=[evaluation]).test(model, datamodule=Digits(), verbose=False)
    return evaluation.results.to_dict(), root / "digits" / "version_0"


def test_every_new_attack_reaches_the_results_file(evaluated):
    results, run = evaluated
    assert [a["name"] for a in results["attacks"]] == NAMES
    on_disk = json.loads((run / "robustness.json").read_text())
    assert [a["name"] for a in on_disk["attacks"]] == NAMES
    by_name = {a["name"]: a for a in results["attacks"]}
    clean = results["clean"]["accuracy"]
    assert clean > 0.8
    # DeepFool has no budget, reports its perturbation sizes, and fools nearly every point
    deepfool = by_name["deepfool-50"]
    assert deepfool["eps"] is None and deepfool["norm"] == "l2" and deepfool["overshoot"] == 0.02
    sizes = results["per_example_metrics"]["deepfool-50"]
    assert len(sizes["rho"]) == len(sizes["l2_median"]) == 60 and min(sizes["rho"]) > 0
    assert deepfool["metrics"]["rho"] == pytest.approx(statistics.fmean(sizes["rho"]))
    assert deepfool["metrics"]["l2_median"] == pytest.approx(statistics.median_low(sizes["l2_median"]))
    assert deepfool["accuracy"] < 0.1
    # a point survives the multi-targeted attack only if it survives every target: never above untargeted PGD
    assert by_name["pgd_targeted-10 target=all eps=0.1"]["accuracy"] <= by_name["pgd-10 eps=0.1"]["accuracy"]
    assert by_name["lrc zeta=2 samples=5 eps=0.1"]["zeta"] == 2 and by_name["lrc zeta=2 samples=5 eps=0.1"][
        "samples"] == 5
    # random noise of these sizes barely hurts; every accuracy is a real fraction of the 60 examples
    assert by_name["uniform_noise eps=0.1"]["accuracy"] > by_name["pgd-10 eps=0.1"]["accuracy"]
    for a in results["attacks"]:
        assert a["n"] == 60 and a["correct"] == sum(results["per_example"][a["name"]]) and a["accuracy"] <= clean
    assert all(v["passed"] for v in results["sanity"]["verdicts"]), results["sanity"]["verdicts"]


def test_markdown_and_tensorboard_show_the_sizes(evaluated):
    results, run = evaluated
    markdown = (run / "robustness.md").read_text()
    assert markdown.startswith("| setting | accuracy | correct / n | perturbation |")
    rho = results["attacks"][0]["metrics"]["rho"]
    assert "| deepfool-50 | " in markdown and f"rho {rho:.4g}" in markdown
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"robustness/{name}" for name in NAMES} <= tags
    assert {"robustness/deepfool-50/rho", "robustness/deepfool-50/l2_median"} <= tags
    assert events.Scalars("robustness/deepfool-50/rho")[-1].value == pytest.approx(rho)


def test_report_shows_sizes_and_the_eps_grid_average(evaluated, capsys):
    results, run = evaluated
    header, body = report.table(report.collect([run]), eps_average="add")
    row = dict(zip(header, body[0], strict=True))
    assert row["deepfool-50 rho"] == pytest.approx(results["attacks"][0]["metrics"]["rho"])
    by_name = {a["name"]: 100 * a["accuracy"] for a in results["attacks"]}
    average = "uniform_noise mean over eps {0.1, 0.3}"
    assert header.index(average) == header.index("uniform_noise eps=0.3") + 1
    assert row[average] == pytest.approx((by_name["uniform_noise eps=0.1"] + by_name["uniform_noise eps=0.3"]) / 2)
    only, body = report.table(report.collect([run]), eps_average="only")
    assert "uniform_noise eps=0.1" not in only and average in only and "deepfool-50 rho" in only
    report.main([str(run), "--eps-average", "only"])
    printed = capsys.readouterr().out
    assert "lrc zeta=2 samples=5 mean over eps {0.1, 0.3}" in printed
    assert f"{results['attacks'][0]['metrics']['rho']:.4g}" in printed  # sizes print as sizes, not percent


@pytest.mark.parametrize("entry,message", [
    ({"attack": "deepfool", "eps": 0.1}, "deepfool has no budget"),
    ({"attack": "lrc", "eps": 0.1, "zetta": 4}, "lrc: unknown parameter 'zetta'; lrc takes eps, zeta, samples"),
    ({"attack": "pgd_targeted", "eps": 0.1, "target": "every"}, "pgd_targeted target must be one of random, all"),
    ({"attack": "uniform_noise", "eps": 0.1, "steps": 10}, "uniform_noise takes no steps"),
    ({"attack": "deepfool", "overshoot": -1}, "deepfool overshoot must be a number >= 0"),
    ({"attack": "pgd", "eps": 0.1, "bpda": True, "surrogate": "tanh"}, "either bpda"),
    ({"attack": "fgsm", "eps": 0.1, "surrogate": "sigmoid"}, "unknown surrogate 'sigmoid'"),
])
def test_a_wrong_parameter_names_the_attack_and_what_it_takes(entry, message):
    with pytest.raises(ValueError) as error:
        AttackSetting(**entry)
    assert message in str(error.value)


def test_the_cli_refuses_a_wrong_parameter_or_surrogate_before_training(tmp_path):
    for suite, message in [('[{"attack": "lrc", "eps": 0.1, "zetta": 4}]', "lrc takes eps, zeta, samples"),
                           ('[{"attack": "pgd", "eps": 0.1, "surrogate": "tanh"}]', "no module of DigitsCNN")]:
        proc = advtrain("fit", "-c", config("demo/standard.yaml"), "--evaluation.attacks", suite, cwd=tmp_path,
                        check=False, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert not list(tmp_path.glob("runs/**/*.ckpt"))


def test_bpda_through_the_evaluation_beats_the_oblivious_and_the_masked_attack(tmp_path):
    """Feature squeezing on digits: the white-box attack through the rounding is masked (the sanity check says
    so); BPDA, crafted with the identity backward, is at least as strong as the oblivious attacker."""
    model = train(FeatureSqueezing(DigitsMLP(hidden=64), bits=5, median_size=2), epochs=8)
    suite = [{"attack": "pgd", "eps": 0.15, "steps": 20}, {"attack": "pgd", "eps": 0.15, "steps": 20,
                                                           "surrogate": "oblivious"},
             {"attack": "pgd", "eps": 0.15, "steps": 20, "bpda": True}]
    evaluation = RobustnessEvaluation(attacks=suite, limit=120)
    with pytest.warns(UserWarning, match="large_eps_near_zero"):
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   inference_mode=False, default_root_dir=tmp_path,
                   callbacks=[evaluation]).test(model, datamodule=Digits(), verbose=False)
    masked, oblivious, bpda = evaluation.results.to_dict()["attacks"]
    assert [masked["name"], oblivious["name"], bpda["name"]] == [
        "pgd-20 eps=0.15", "pgd-20 squeeze=oblivious eps=0.15", "pgd-20 bpda eps=0.15"]
    assert bpda["accuracy"] <= oblivious["accuracy"] < masked["accuracy"] - 0.3
    assert bpda["bpda"] and oblivious["surrogate"] == "oblivious"
    assert model.network.surrogate == "exact"  # restored after crafting


def test_advtrain_covariance_writes_the_data_sets_covariance_for_lrc(tmp_path, trained_mlp):
    out = tmp_path / "digits_cov.pt"
    advtrain("covariance", "-c", config("demo/standard.yaml"), "--output", out, cwd=tmp_path, timeout=120)
    covariance = torch.load(out, weights_only=True)
    data = Digits()
    data.setup("fit")
    x = data.train_set.x.double().flatten(1) / 255  # the training split in [0, 1], no augmentation
    torch.testing.assert_close(covariance, torch.cov(x.T), rtol=1e-4, atol=1e-7)  # inputs are float32 images
    again = advtrain("covariance", "-c", config("demo/standard.yaml"), "--output", out, cwd=tmp_path, check=False)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwritten
    # the LRC attack samples with it: eps is then the root-mean-square per-pixel standard deviation
    setting = AttackSetting("lrc", eps=0.1, covariance=str(out), samples=3).expand()[0]
    assert setting.name == f"lrc zeta=4 samples=3 covariance={out} eps=0.1"
    images = x[:16].float().view(-1, 1, 8, 8)
    x_adv = setting.run(trained_mlp, images, torch.zeros(16, dtype=torch.long), generator=torch.Generator())
    assert x_adv.shape == images.shape and 0 <= x_adv.min() and x_adv.max() <= 1 and not torch.equal(x_adv, images)
