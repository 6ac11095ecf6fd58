"""The defensive-tensorization recipes run end to end on fixture files in the real formats: a theta = 1 model is
trained, the theta < 1 recipe starts from its checkpoint by Tucker decomposition, and the evaluation runs EOT,
omniscient and surrogate-gradient attacks over several draws."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from cli_utils import ROOT, last_checkpoint
from fixtures_data import cifar10_files, write_speech_commands

from advtrain.cli import AdvtrainCLI
from advtrain.networks import CIFAR10_MEAN, CIFAR10_STD, ResNet18, Tensorized, TuckerConv, randomness_off
from advtrain.networks.binary import XNOR

FAST = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.max_epochs=1"]


def fit(cfg, *overrides):
    run = AdvtrainCLI(args=["fit", "-c", str(ROOT / cfg), *FAST, *overrides])
    return run, last_checkpoint(run.trainer)


def evaluate(cfg, ckpt, suite, *overrides):
    run = AdvtrainCLI(args=["test", "-c", str(ROOT / cfg), "--ckpt_path", ckpt, "--evaluation.attacks",
                            json.dumps(suite), "--evaluation.draws=3", *FAST, *overrides])
    return json.loads((Path(run.trainer.log_dir) / f"robustness-{Path(ckpt).stem}.json").read_text())


def cifar(tmp_path, monkeypatch):
    cifar10_files(tmp_path / "data", monkeypatch, n_per_batch=8, n_test=6)
    monkeypatch.chdir(tmp_path)
    # ResNet-18 at width 8 (the recipes' architecture, 1/8 of the channels) keeps these tests to seconds
    return ["--data.init_args.val_size=8", "--data.init_args.batch_size=16"]


NARROW = "--model.init_args.network.init_args.network.init_args.width=8"
NARROW_BINARY = "--model.init_args.network.init_args.network.init_args.network.init_args.width=8"


def test_cifar10_theta_0_9_starts_from_the_theta_1_checkpoint_and_is_evaluated_with_eot(tmp_path, monkeypatch):
    data = cifar(tmp_path, monkeypatch)
    plain, plain_ckpt = fit("configs/cifar10/tensorized_theta1.yaml", *data,
                            "--model.init_args.network.init_args.width=8")
    data += [NARROW, f"--model.init_args.network.init_args.checkpoint={plain_ckpt}"]
    tensorized, ckpt = fit("configs/cifar10/tensorized_theta0.9.yaml", *data)
    network = tensorized.model.network
    assert sum(isinstance(m, TuckerConv) for m in network.modules()) == 20  # every conv of ResNet-18
    # at construction the tensorized network was the decomposed plain one: check on a fresh instance
    fresh = Tensorized(ResNet18(num_classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD, width=8), rank=1.0, theta=0.9,
                       checkpoint=plain_ckpt).eval()
    x = torch.rand(2, 3, 32, 32)
    with randomness_off(fresh):
        torch.testing.assert_close(fresh(x), plain.model.network.eval()(x), atol=1e-4, rtol=1e-3)
    suite = [{"attack": "pgd", "eps": "8/255", "steps": 2}, {"attack": "pgd", "eps": "8/255", "steps": 2, "eot": 2},
             {"attack": "fgsm", "eps": "8/255", "omniscient": True}]
    results = evaluate("configs/cifar10/tensorized_theta0.9.yaml", ckpt, suite, *data)
    assert results["randomized"] and results["draws"] == 3 and results["n"] == 6
    assert [a["eot_samples"] for a in results["attacks"]] == [1, 2, 1] and results["attacks"][2]["omniscient"]
    assert "no EOT" in results["note"]
    assert {t["surrogate"] for t in results["transfer"]} == {"theta=1 (same network, randomness off)"}
    # Table 2's recipe: PGD-AT on the theta = 0.95 network, from a plain checkpoint of the same architecture
    pgd_at, _ = fit("configs/cifar10/tensorized_pgd_at.yaml", *data, "--model.init_args.attack.steps=2")
    assert type(pgd_at.model).__name__ == "PGDAT" and pgd_at.model.network.network.conv1.theta == 0.95
    assert pgd_at.trainer.global_step == 2


def test_cifar10_binary_tensorized_starts_from_the_binary_checkpoint(tmp_path, monkeypatch):
    data = cifar(tmp_path, monkeypatch)
    binary, binary_ckpt = fit("configs/cifar10/binary.yaml", *data, NARROW)
    assert sum(isinstance(m, XNOR) for m in binary.model.network.modules()) == 19  # all but first conv, head
    data += [NARROW_BINARY, f"--model.init_args.network.init_args.checkpoint={binary_ckpt}"]
    tensorized, ckpt = fit("configs/cifar10/binary_tensorized.yaml", *data)
    xnor = [m for m in tensorized.model.network.modules() if isinstance(m, XNOR)]
    assert len(xnor) == 19 and all(isinstance(m.layer, TuckerConv) for m in xnor if m.layer.weight.dim() == 4)
    suite = [{"attack": "fgsm", "eps": "8/255", "surrogate": s} for s in ("ste", "tanh", "tanh0.75")]
    results = evaluate("configs/cifar10/binary_tensorized.yaml", ckpt, suite, *data)
    assert [a["surrogate"] for a in results["attacks"]] == ["ste", "tanh", "tanh0.75"]
    assert results["randomized"]


def test_speech_commands_soundnet5_recipes_run_on_a_fixture_folder(tmp_path, monkeypatch):
    write_speech_commands(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    data = ["--data.init_args.batch_size=16"]
    plain, plain_ckpt = fit("configs/speech_commands/soundnet5.yaml", *data)
    assert type(plain.model.network).__name__ == "SoundNet5"
    suite = [{"attack": "fgsm", "eps": 0.032}, {"attack": "pgd", "eps": 0.032, "steps": 3, "eot": 2}]
    results = evaluate("configs/speech_commands/soundnet5.yaml", plain_ckpt, suite[:1], *data)
    assert not results["randomized"] and results["sanity"]["runs"][1]["eps"] == 1.0  # half of [-1, 1]
    _, ckpt = fit("configs/speech_commands/soundnet5_tensorized.yaml", *data,
                  f"--model.init_args.network.init_args.checkpoint={plain_ckpt}")
    results = evaluate("configs/speech_commands/soundnet5_tensorized.yaml", ckpt, suite, *data,
                   f"--model.init_args.network.init_args.checkpoint={plain_ckpt}")
    assert results["randomized"] and results["attacks"][1]["eot_samples"] == 2
    binary, ckpt = fit("configs/speech_commands/soundnet5_binary.yaml", *data)
    assert any(isinstance(m, XNOR) for m in binary.model.network.modules())


def test_audio_attacks_stay_in_the_waveform_range(tmp_path, monkeypatch):
    """Speech Commands lives in [-1, 1]: the evaluation's attacks clamp there, not to [0, 1]."""
    from advtrain.attacks import AttackSetting
    from advtrain.evaluation import craft
    from advtrain.networks import SoundNet5

    torch.manual_seed(0)
    x = torch.rand(4, 1, 16000) * 2 - 1
    y = torch.randint(0, 12, (4,))
    setting = AttackSetting("pgd", eps=0.063, steps=2).expand()[0]
    x_adv = craft(setting, SoundNet5().eval(), x, y, bounds=(-1.0, 1.0))
    assert x_adv.min() < -0.5 and x_adv.min() >= -1 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= 0.063 + 1e-6


def test_a_resumed_tensorized_run_redraws_the_same_masks(tmp_path, monkeypatch):
    """The masks come from the global RNG, which the checkpoint stores: 1 epoch + resume = 2 epochs, bitwise."""
    def weights(folder, *runs):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        for args in runs:
            model = AdvtrainCLI(args=["fit", "-c", str(ROOT / "configs/demo/tensorized.yaml"), *FAST[:-1], *args]).model
        return model.network.state_dict()

    straight = weights("straight", ["--trainer.max_epochs=2"])
    resumed = weights("resumed", ["--trainer.max_epochs=1"], ["--trainer.max_epochs=2", "--ckpt_path", "last"])
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
