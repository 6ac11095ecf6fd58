"""Every shipped config parses, and the MNIST / CIFAR-10 recipes run end to end on fixture files
written in the real on-disk formats (through torchvision's dataset classes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_utils import ROOT, last_checkpoint
from fixtures_data import cifar10_files, write_mnist

from advtrain.cli import AdvtrainCLI

CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name not in ("trainer", "tables"))
FAST = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
        "--trainer.devices=1"]
CHEAP_SUITE = '[{"attack": "fgsm", "eps": "8/255"}, {"attack": "pgd", "eps": "8/255", "steps": 3}]'


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_config_parses(cfg, capsys):
    with pytest.raises(SystemExit) as exit_info:
        AdvtrainCLI(args=["fit", "-c", str(cfg), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: advtrain.defenses." in printed and "class_path: advtrain.datamodules." in printed


@pytest.mark.parametrize("preset", ["gpu", "ddp"])
def test_trainer_presets_compose_with_an_experiment(preset, capsys):
    with pytest.raises(SystemExit):
        AdvtrainCLI(args=["fit", "-c", str(ROOT / "configs/cifar10/pgd_at.yaml"), "-c",
                          str(ROOT / f"configs/trainer/{preset}.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    assert "precision: bf16-mixed" in printed and "channels_last: true" in printed
    assert "class_path: advtrain.defenses.PGDAT" in printed  # the preset did not replace the experiment's model


PRESET_SUITE = '[{"attack": "pgd", "eps": "8/255", "steps": 3}, {"attack": "autoattack", "eps": "8/255"}]'


def run_gpu_preset(tmp_path, monkeypatch, *device) -> tuple:
    """``configs/trainer/gpu.yaml`` as users run it (after the experiment config): fit the CIFAR-10 PGD-AT recipe on
    fixture files, then test it with AutoAttack; ``device`` overrides what the machine lacks. Shared with
    tests/integration/test_gpu.py, which runs it on CUDA in bf16."""
    cifar10_files(tmp_path / "data", monkeypatch, n_per_batch=8, n_test=10)
    monkeypatch.chdir(tmp_path)
    configs = ["-c", str(ROOT / "configs/cifar10/pgd_at.yaml"), "-c", str(ROOT / "configs/trainer/gpu.yaml")]
    common = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *device,
              "--data.init_args.val_size=8", "--data.init_args.batch_size=16"]
    fit = AdvtrainCLI(args=["fit", *configs, "--trainer.max_epochs=1", "--model.init_args.attack.steps=2", *common])
    assert fit.model.channels_last
    AdvtrainCLI(args=["test", *configs, "--ckpt_path", last_checkpoint(fit.trainer), "--evaluation.attacks",
                      PRESET_SUITE, *common])
    results = tmp_path / "runs" / "cifar10" / "pgd_at" / "version_0" / "robustness-last.json"
    return fit, json.loads(results.read_text())


def test_the_gpu_preset_fits_and_tests_with_autoattack_on_the_cpu(tmp_path, monkeypatch):
    """make test's twin of make test-gpu's preset check: gpu.yaml's channels_last and cudnn benchmark as shipped,
    on the CPU and in float32 (no CUDA, and no bf16 autocast that a CPU would emulate slowly), on a 3-channel
    network small enough for AutoAttack on a CPU."""
    # a small 3-channel CNN instead of the ResNet-18: AutoAttack's Square (5000 queries per surviving point) on a
    # ResNet-18 takes minutes on a CPU
    small = ["--model.init_args.network.class_path=advtrain.networks.CNN4C3F",
             '--model.init_args.network.init_args={"width": 4, "in_channels": 3, "input_size": 32, "hidden": 16}']
    fit, results = run_gpu_preset(tmp_path, monkeypatch, "--trainer.accelerator=cpu", "--trainer.precision=32-true",
                                  *small)
    assert type(fit.model.network).__name__ == "CNN4C3F" and fit.trainer.precision == "32-true"
    assert [a["name"] for a in results["attacks"]] == ["pgd-3 eps=8/255", "autoattack-standard eps=8/255"]
    assert results["precision"] == "32" and results["n"] == 10
    assert results["attacks"][1]["correct"] <= results["attacks"][0]["correct"] <= results["clean"]["correct"]


def fit_and_test(cfg, *overrides):
    fit = AdvtrainCLI(args=["fit", "-c", str(ROOT / cfg), "--trainer.max_epochs=1", *FAST, *overrides])
    last = last_checkpoint(fit.trainer)
    assert last.endswith("last.ckpt")
    test = AdvtrainCLI(args=["test", "-c", str(ROOT / cfg), "--ckpt_path", last, "--evaluation.attacks", CHEAP_SUITE,
                             *FAST, *overrides])
    return fit, json.loads((Path(test.trainer.log_dir) / "robustness-last.json").read_text())


def test_cifar10_pgd_at_recipe_runs_on_fixture_files(tmp_path, monkeypatch):
    cifar10_files(tmp_path / "data", monkeypatch, n_per_batch=8, n_test=10)
    monkeypatch.chdir(tmp_path)
    fit, results = fit_and_test("configs/cifar10/pgd_at.yaml", "--data.init_args.val_size=8",
                                "--data.init_args.batch_size=16", "--model.init_args.attack.steps=2")
    assert type(fit.model.network).__name__ == "ResNet18"
    assert fit.trainer.global_step == 2  # 32 training images in batches of 16
    assert results["n"] == 10 and [a["name"] for a in results["attacks"]] == ["fgsm eps=8/255", "pgd-3 eps=8/255"]
    assert (tmp_path / "runs" / "cifar10" / "pgd_at" / "version_0" / "robustness-last.json").exists()


def test_cifar10_fgsm_rs_recipe_steps_its_cyclic_lr_every_batch(tmp_path, monkeypatch):
    cifar10_files(tmp_path / "data", monkeypatch, n_per_batch=8, n_test=10)
    monkeypatch.chdir(tmp_path)
    fit = AdvtrainCLI(args=["fit", "-c", str(ROOT / "configs/cifar10/fgsm_rs.yaml"), "--trainer.max_epochs=2",
                            "--data.init_args.val_size=8", "--data.init_args.batch_size=8", *FAST,
                            "--model.init_args.lr_scheduler.init_args.epochs=[0, 1, 2]"])
    assert type(fit.model.network).__name__ == "PreActResNet18"
    scheduler = fit.trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step" and fit.trainer.global_step == 8
    # triangle 0 -> 0.2 -> 0 over 2 epochs of 4 steps: after 8 steps the lr is back at 0
    assert scheduler.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_cifar10_trades_recipe_runs_with_a_small_wide_resnet(tmp_path, monkeypatch):
    cifar10_files(tmp_path / "data", monkeypatch, n_per_batch=8, n_test=10)
    monkeypatch.chdir(tmp_path)
    fit, results = fit_and_test("configs/cifar10/trades.yaml", "--data.init_args.val_size=8",
                                "--data.init_args.batch_size=16", "--model.init_args.attack.steps=2",
                                "--model.init_args.network.init_args.depth=10",
                                "--model.init_args.network.init_args.widen_factor=1")
    assert type(fit.model).__name__ == "TRADES" and fit.model.beta == 6.0
    logged = fit.trainer.logged_metrics
    assert {"train/ce", "train/kl", "train/loss"} <= set(logged)


@pytest.mark.parametrize("recipe", ["standard", "pgd_at", "trades"])
def test_mnist_recipes_run_on_fixture_files(tmp_path, monkeypatch, recipe):
    write_mnist(tmp_path / "data", n_train=60, n_test=20)
    monkeypatch.chdir(tmp_path)
    fit, results = fit_and_test(f"configs/mnist/{recipe}.yaml", "--data.init_args.val_size=10",
                                "--data.init_args.batch_size=25")
    assert type(fit.model.network).__name__ == "CNN4C3F"
    assert fit.trainer.global_step == 2 and results["n"] == 20


def test_bf16_autocast_and_channels_last_train_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit = AdvtrainCLI(args=["fit", "-c", str(ROOT / "configs/demo/pgd_at.yaml"), "--trainer.max_epochs=1",
                            "--trainer.precision=bf16-mixed", "--model.init_args.channels_last=true", *FAST])
    net = fit.model.network
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fit.trainer.precision == "bf16-mixed"
    assert 0.2 < float(fit.trainer.callback_metrics["val/acc_clean"]) <= 1


def write_tiny_imagenet(root, wnids, n_train=3, n_val=2):
    from PIL import Image

    for split, n in (("train", n_train), ("val", n_val)):
        for k, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                pixels = torch.full((40, 48, 3), 40 * k + 10 * i, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{i}.JPEG")
    (root / "classes.txt").write_text("\n".join(wnids) + "\n")


def test_imagenet100_nuat_wa_recipe_runs_on_a_fixture_folder(tmp_path, monkeypatch):
    write_tiny_imagenet(tmp_path / "imagenet", ["n01000001", "n01000002", "n01000003", "n01000004"])
    monkeypatch.chdir(tmp_path)
    fit, results = fit_and_test(
        "configs/imagenet100/nuat_wa.yaml", "--data.init_args.root=imagenet",
        "--data.init_args.class_list=imagenet/classes.txt", "--data.init_args.image_size=32",
        "--data.init_args.resize_size=36", "--data.init_args.num_workers=0", "--data.init_args.pin_memory=false",
        "--data.init_args.batch_size=4", "--data.init_args.val_size=4",
        "--model.init_args.network.init_args.num_classes=4")
    assert type(fit.model).__name__ == "NuAT" and fit.model.callback_with("attack_network") is not None
    assert fit.trainer.global_step == 2  # 8 training images in batches of 4
    assert results["n"] == 8 and results["network"] == "TorchvisionNet"


@pytest.mark.parametrize("cfg,network", [("mnist/adr", "CNN4C3F"), ("cifar10/adr_resnet", "MadryResNet")])
def test_adr_recipes_run_on_fixture_files_and_draw_the_supplementary_figures(cfg, network, tmp_path, monkeypatch):
    if cfg.startswith("mnist"):
        write_mnist(tmp_path / "data", n_train=60, n_test=12)
    else:
        cifar10_files(tmp_path / "data", monkeypatch, n_per_batch=12, n_test=12)
    monkeypatch.chdir(tmp_path)
    fit, results = fit_and_test(f"configs/{cfg}.yaml", "--data.init_args.val_size=10", "--data.init_args.batch_size=25",
                                "--model.init_args.attack.steps=2", "--model.init_args.val_attack.steps=1")
    assert type(fit.model).__name__ == "ADR" and type(fit.model.network).__name__ == network
    assert fit.trainer.global_step == 2 and results["n"] == 12
    assert {"train/lc", "train/gc", "train/smt", "train/ce_clean", "train/ce_adv"} <= set(fit.trainer.logged_metrics)
    run = Path(results["run_dir"]) if "run_dir" in results else tmp_path / "runs" / cfg / "version_0"
    # at test: the t-SNE of z (supplementary Figs. 3-4) and the loss in input and latent space (Figs. 1-2)
    assert list((run / "latent_tsne").glob("test*.png"))
    assert {p.name for p in (run / "landscape").glob("*.png")} >= {"point0_theta1.png", "point0_latent_theta1.png"}
