"""The SGR paper's configs (configs/{mnist,cifar10}/<row>.yaml, configs/demo/{gn,sgr}.yaml) build what their
headers say, share one evaluation suite per data set, and the tables' tools run on tiny digits runs of GN and
SGR: ``advtrain report --eps-average``, the LRC figure (evaluation/figures.py) and ``advtrain transfer``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from cli_utils import ROOT, last_checkpoint
from fixtures_data import cifar10_files, write_mnist

from advtrain import report, transfer
from advtrain.attacks import AttackSetting, attack_mode, pgd
from advtrain.cli import AdvtrainCLI
from advtrain.evaluation import Accuracy, EvaluationResults, SettingResult
from advtrain.evaluation.figures import MEAN, lrc_curves, panels

ROWS = ["clean", "wdecay", "pgd_aug", "fgsm_aug", "gn", "sgr", "sgr_grad", "sgr_sign", "sgr_fgsm", "sgr_pgd"]
SOURCES = {"sgr": "sign", "sgr_grad": "gradient", "sgr_sign": "sign", "sgr_fgsm": "fgsm", "sgr_pgd": "pgd"}
GRIDS = {"mnist": [0.05, 0.1, 0.2, 0.3], "cifar10": [k / 255 for k in (1, 2, 4, 8)]}
VARIANTS = {"mnist": ("mnist", "MNIST"), "cifar10": ("cifar", "CIFAR10")}
ZETAS = [1.0, 2.0, 4.0, 8.0, 16.0]


def build(config, *more):
    return AdvtrainCLI(args=["-c", str(config), "--trainer.logger=false", *more], run=False)


def tracker_of(cli):
    return next((cb for cb in cli.trainer.callbacks if type(cb).__name__ == "CovarianceTracker"), None)


def suite_of(cli) -> list[dict]:
    evaluation = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RobustnessEvaluation")
    return [s.as_dict() for s in evaluation.settings]


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_every_row_of_the_tables_builds_what_its_header_says(dataset, tmp_path, monkeypatch):
    variant, data_class = VARIANTS[dataset]
    if dataset == "mnist":  # the datamodules check their files when built: small ones in the real formats
        write_mnist(tmp_path / "data", n_train=20, n_test=10)
    else:
        cifar10_files(tmp_path / "data", monkeypatch, n_per_batch=4, n_test=10)
    monkeypatch.chdir(tmp_path)
    suites = {}
    for row in ROWS:
        path = ROOT / "configs" / dataset / f"{row}.yaml"
        header = path.read_text().split("\nseed_everything")[0]
        assert header.startswith("# SGR paper") and "The paper's:" in header and "Our choice" in header, path
        cli = build(path)
        model, net, data = cli.model, cli.model.network, cli.datamodule
        expected = {"clean": "Standard", "wdecay": "Standard", "pgd_aug": "MixtureAT", "fgsm_aug": "MixtureAT",
                    "gn": "GN"}.get(row, "SGR")
        assert type(model).__name__ == expected, row
        assert type(net).__name__ == "CarliniCNN" and net.variant == variant
        optimizer = model.optimizer_factory(net.parameters())
        assert type(optimizer).__name__ == "Adam" and optimizer.defaults["lr"] == 1e-3
        assert optimizer.defaults["weight_decay"] == (5e-4 if row == "wdecay" else 0), row
        scheduler = model.scheduler_factory(optimizer)
        assert type(scheduler).__name__ == "CosineAnnealingLR" and scheduler.T_max == cli.trainer.max_epochs
        assert type(data).__name__ == data_class and (data.crop_padding, data.flip, data.batch_size) == (4, True, 128)
        assert cli.config["checkpoint"]["monitor"] is None  # final weights for every row
        if row in ("pgd_aug", "fgsm_aug"):
            assert (model.attack.attack, model.lam) == (row.split("_")[0], 0.5)
        tracker = tracker_of(cli)
        if row.startswith("sgr"):
            assert model.sigma == "tracked" and not model.uncentred
            assert (tracker.source, tracker.representation, tracker.beta, tracker.scale) == \
                   (SOURCES[row], "stationary", 0.1, "data"), row
        else:
            assert tracker is None, row
        if row == "gn":
            assert model.sigma == "identity"
        suites[row] = suite_of(cli)
    first = suites["clean"]
    assert all(suite == first for suite in suites.values())  # the report's columns line up
    by_attack: dict[str, list[dict]] = {}
    for setting in first:
        by_attack.setdefault(setting["attack"], []).append(setting)
    assert set(by_attack) == {"uniform_noise", "fgsm", "pgd", "pgd_targeted", "deepfool", "lrc"}
    for attack in ("uniform_noise", "fgsm", "pgd", "pgd_targeted"):
        assert [s["eps"] for s in by_attack[attack]] == pytest.approx(GRIDS[dataset]), attack
    assert {s["target"] for s in by_attack["pgd_targeted"]} == {"random"}
    assert len(by_attack["deepfool"]) == 1 and by_attack["deepfool"][0]["overshoot"] == 0.02
    lrc = by_attack["lrc"]
    assert sorted({s["zeta"] for s in lrc}) == ZETAS and {s["samples"] for s in lrc} == {100}
    grids = {z: sorted(s["eps"] for s in lrc if s["zeta"] == z) for z in ZETAS}
    assert len({tuple(g) for g in grids.values()}) == 1 and len(grids[1.0]) >= 3  # one eps grid for every zeta


def test_demo_configs_are_gn_and_sgr_on_digits_with_the_demo_suite():
    for name, defense in (("gn", "GN"), ("sgr", "SGR")):
        cli = build(ROOT / "configs" / "demo" / f"{name}.yaml")
        assert type(cli.model).__name__ == defense and type(cli.model.network).__name__ == "DigitsCNN"
        assert type(cli.datamodule).__name__ == "Digits" and cli.model.eps == 0.2
        assert (tracker_of(cli) is not None) == (name == "sgr")
        attacks = {s["attack"]: s for s in suite_of(cli)}
        assert set(attacks) >= {"pgd", "deepfool", "lrc"} and attacks["pgd"]["eps"] == 0.2


@pytest.mark.parametrize("config", ["mnist/sgr_pgd", "cifar10/sgr"])
def test_sgr_rows_train_and_test_on_fixture_files(config, tmp_path, monkeypatch):
    """A table row end to end on files in the real formats: the tracker feeds Sigma to SGR at the data's shape."""
    if config.startswith("mnist"):
        write_mnist(tmp_path / "data", n_train=60, n_test=10)
    else:
        cifar10_files(tmp_path / "data", monkeypatch, n_per_batch=12, n_test=10)
    monkeypatch.chdir(tmp_path)
    common = ["--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--trainer.devices=1",
              "--data.init_args.val_size=10", "--data.init_args.batch_size=25", "--model.init_args.val_attack.steps=1",
              "--evaluation.attacks", '[{"attack": "pgd", "eps": 0.1, "steps": 2}, '
              '{"attack": "lrc", "zeta": 2, "eps": 0.1, "samples": 2}]', "--evaluation.sanity_checks=false"]
    fit = AdvtrainCLI(args=["fit", "-c", str(ROOT / "configs" / f"{config}.yaml"), "--trainer.max_epochs=1", *common])
    assert fit.trainer.global_step == 2
    tracker = tracker_of(fit)
    # the rows update Sigma on the first batch and then every update_every-th (10): once in these two batches
    assert tracker.update_every == 10
    assert fit.model.covariance is tracker.covariance and tracker.batches == 2 and tracker.updates == 1
    assert torch.isfinite(fit.trainer.callback_metrics["train/omega"])
    last = last_checkpoint(fit.trainer)
    test = AdvtrainCLI(args=["test", "-c", str(ROOT / "configs" / f"{config}.yaml"), "--ckpt_path", last, *common])
    results = json.loads((Path(test.trainer.log_dir) / "robustness-last.json").read_text())
    assert [a["name"] for a in results["attacks"]] == ["pgd-2 eps=0.1", "lrc zeta=2 samples=2 eps=0.1"]


# ---- the tables' tools on tiny digits runs of GN and SGR -------------------------------------------------------

SUITE = ('[{"attack": "pgd", "eps": 0.2, "steps": 3}, {"attack": "deepfool", "steps": 5}, '
         '{"attack": "lrc", "zeta": 1, "eps": [0.1, 0.3], "samples": 4}, '
         '{"attack": "lrc", "zeta": 4, "eps": [0.1, 0.3], "samples": 4}]')
QUICK = ["--trainer.max_epochs=2", "--trainer.limit_val_batches=1",
         "--model.init_args.val_attack.steps=1", "--trainer.enable_progress_bar=false", "--evaluation.limit=48",
         "--evaluation.sanity_checks=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """gn and sgr demo runs of two epochs each, tested with a small suite: {name: (checkpoint, results)}."""
    root = tmp_path_factory.mktemp("sgr_tables")
    out = {}
    for name in ("gn", "sgr"):
        config = str(ROOT / "configs" / "demo" / f"{name}.yaml")
        common = [f"--trainer.logger.init_args.save_dir={root / 'runs'}", "--evaluation.attacks", SUITE, *QUICK]
        fit = AdvtrainCLI(args=["fit", "-c", config, *common])
        last = last_checkpoint(fit.trainer)
        assert last.endswith("last.ckpt") and fit.trainer.global_step == 40  # 2 epochs of 20 batches
        test = AdvtrainCLI(args=["test", "-c", config, "--ckpt_path", last, *common])
        results = json.loads((Path(test.trainer.log_dir) / "robustness-last.json").read_text())
        out[name] = (last, results)
    return root, out


def lrc_accuracy(results, zeta, eps_label):
    (entry,) = [a for a in results["attacks"] if a["attack"] == "lrc" and a["zeta"] == zeta
                and a["eps_label"] == eps_label]
    return 100 * entry["accuracy"]


def test_report_averages_each_lrc_curve_over_its_eps_grid(runs, capsys):
    root, out = runs
    report.main([str(root / "runs"), "--eps-average", "add"])
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for zeta in (1, 4):
        column = header.index(f"lrc zeta={zeta} samples=4 mean over eps {{0.1, 0.3}}")
        for line in lines[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            results = out[cells[0].split(" ")[0]][1]  # row "gn [last]": experiment, checkpoint
            expected = (lrc_accuracy(results, zeta, "0.1") + lrc_accuracy(results, zeta, "0.3")) / 2
            assert float(cells[column]) == pytest.approx(expected, abs=0.006)
    assert any("deepfool-5 rho" in h for h in header)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_lrc_figure_as_png_and_tensorboard_from_the_results(runs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, out = runs
    png, board = tmp_path / "lrc.png", tmp_path / "board"
    report.main([str(root / "runs"), "--lrc-plot", str(png), "--tensorboard", str(board)])
    width, height = png_size(png)
    assert width > 3 * height / 2  # three panels side by side: eps 0.1, eps 0.3, the mean
    events = EventAccumulator(str(board), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "lrc/accuracy_vs_zeta" in events.Tags()["images"]
    for name, (_, results) in out.items():
        row = f"{name} [last]"  # as advtrain report names the row: experiment [checkpoint]
        for eps in ("0.1", "0.3"):
            curve = {e.step: e.value for e in events.Scalars(f"lrc/{eps}/{row}")}
            assert curve == pytest.approx({z: lrc_accuracy(results, z, eps) for z in (1, 4)})
        mean = {e.step: e.value for e in events.Scalars(f"lrc/{MEAN}/{row}")}
        assert mean == pytest.approx({z: (lrc_accuracy(results, z, "0.1") + lrc_accuracy(results, z, "0.3")) / 2
                                      for z in (1, 4)})


def test_report_without_lrc_results_says_so(runs, tmp_path, capsys):
    root, out = runs
    results = {**out["gn"][1], "attacks": [a for a in out["gn"][1]["attacks"] if a["attack"] != "lrc"]}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "robustness.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "run"), "--lrc-plot", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2 and "no" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def entry(accuracy, **setting):
    """A results entry as evaluation/statistics.py makes it."""
    s = AttackSetting(**setting).expand()[0]
    return SettingResult(s.as_dict(), s.name, Accuracy(0, 10, accuracy), seconds=0.1)


def evaluation_of(*entries):
    return EvaluationResults(n=10, randomized=False, draws=1, clean=Accuracy.counted(10, 10), attacks=list(entries))


def test_lrc_curves_order_panels_average_only_complete_grids_and_skip_other_covariances(tmp_path):
    cov = tmp_path / "cov.pt"
    torch.save(torch.eye(4), cov)
    a = evaluation_of(entry(0.5, attack="lrc", zeta=4, eps=0.2), entry(0.75, attack="lrc", zeta=1, eps=0.2),
                      entry(0.25, attack="lrc", zeta=1, eps="4/255"), entry(0.9, attack="pgd", eps=0.1),
                      entry(0.0, attack="lrc", zeta=2, eps=0.2, covariance=str(cov)),
                      entry(0.0, attack="lrc", zeta=2, eps=0.2, channel_correlation=0.9))
    b = evaluation_of(entry(0.6, attack="uniform_noise", eps=0.1))
    curves = lrc_curves([("sgr", a), ("clean", b)])
    assert list(curves) == ["sgr"]  # no LRC results, no line
    assert curves["sgr"] == {"4/255": [(1.0, 25.0)], "0.2": [(1.0, 75.0), (4.0, 50.0)], MEAN: [(1.0, 50.0)]}
    assert panels(curves) == ["4/255", "0.2", MEAN]  # by budget (4/255 < 0.2), not by label


def test_transfer_matrix_between_gn_and_sgr_checkpoints(runs, tmp_path):
    root, out = runs
    paths = [out["gn"][0], out["sgr"][0]]
    attack = '{"attack": "pgd", "eps": 0.2, "steps": 3}'
    result = transfer.main(["-c", str(ROOT / "configs/demo/gn.yaml"), "--checkpoints", *paths, "--attack", attack,
                            "--limit", "40", "--device", "cpu", "--output", str(tmp_path / "m.json")])
    assert result["sources"] == ["gn/version_0/last", "sgr/version_0/last"]
    from advtrain.datamodules import Digits

    data = Digits()
    data.setup("test")
    x, y = data.preprocess(data.eval_dataset("test").__getitems__(list(range(40))), train=False)
    template = build(ROOT / "configs/demo/gn.yaml").model.network
    nets = [transfer.load_network(template, p) for p in paths]
    for i, source in enumerate(nets):  # one batch of 40: the generator of batch 0 under seed 0
        with attack_mode(source):
            x_adv = pgd(source, x, y, 0.2, steps=3, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for j, target in enumerate(nets):
                expected = ((target(x).argmax(1) == y) & (target(x_adv).argmax(1) == y)).float().mean().item()
                assert result["accuracy"][i][j] == pytest.approx(expected)
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == result["accuracy"]
