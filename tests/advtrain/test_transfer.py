"""advtrain transfer: transfer matrices between checkpoints, examples saved to and reused from disk."""

from __future__ import annotations

import json

import pytest
import torch
from cli_utils import ROOT, last_checkpoint

from advtrain import transfer
from advtrain.attacks import attack_mode, pgd
from advtrain.cli import AdvtrainCLI

ATTACK = '{"attack": "pgd", "eps": 0.1, "steps": 5}'


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    paths = []
    for name in ("standard", "pgd_at"):
        cli = AdvtrainCLI(args=["fit", "-c", str(ROOT / f"configs/demo/{name}.yaml"), "--trainer.max_epochs=3",
                                "--trainer.enable_progress_bar=false", "--model.init_args.val_attack.steps=1",
                                f"--trainer.logger.init_args.save_dir={root / 'runs'}"])
        paths.append(last_checkpoint(cli.trainer))
    return root, paths


def test_transfer_matrix_diagonal_is_white_box_and_examples_are_reused(checkpoints, monkeypatch, capsys):
    root, paths = checkpoints
    out = root / "matrix.json"
    args = ["-c", str(ROOT / "configs/demo/standard.yaml"), "--checkpoints", *paths, "--attack", ATTACK,
            "--examples", str(root / "examples"), "--limit", "100", "--output", str(out), "--device", "cpu"]
    result = transfer.main(args)
    assert json.loads(out.read_text())["accuracy"] == result["accuracy"]
    assert len(result["accuracy"]) == 2 and all(len(row) == 2 for row in result["accuracy"])
    assert "crafted on" in capsys.readouterr().out
    # the diagonal is the white-box attack on that checkpoint, computed independently here
    from advtrain.datamodules import Digits

    data = Digits()
    data.setup("test")
    x, y = data.preprocess(data.eval_dataset("test").__getitems__(list(range(100))), train=False)
    for i, path in enumerate(paths):
        template = AdvtrainCLI(args=["-c", str(ROOT / "configs/demo/standard.yaml")], run=False).model.network
        net = transfer.load_network(template, path)
        with attack_mode(net):
            x_adv = pgd(net, x, y, 0.1, steps=5, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            clean = (net(x).argmax(1) == y).float().mean().item()
            expected = ((net(x).argmax(1) == y) & (net(x_adv).argmax(1) == y)).float().mean().item()
        assert result["accuracy"][i][i] == pytest.approx(expected)
        # every cell of column i counts only examples target i classifies correctly when clean
        assert all(result["accuracy"][j][i] <= clean for j in range(2))
    assert result["accuracy"][0][1] != result["accuracy"][1][1]  # the row's examples differ
    saved = sorted(p.name for p in (root / "examples").glob("*.pt"))
    assert len(saved) == 2
    monkeypatch.setattr(transfer, "craft", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-crafted")))
    assert transfer.main(args)["accuracy"] == result["accuracy"]  # loaded from disk, not crafted again


def test_transfer_rejects_bad_input(checkpoints, capsys):
    root, paths = checkpoints
    base = ["-c", str(ROOT / "configs/demo/standard.yaml"), "--checkpoints", *paths]
    with pytest.raises(SystemExit):
        transfer.main([*base, "--attack", '{"attack": "pgdd", "eps": 0.1}'])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # a missing checkpoint: one line and exit code 2
        transfer.main(["-c", str(ROOT / "configs/demo/standard.yaml"), "--checkpoints", str(root / "nowhere.ckpt"),
                       "--attack", ATTACK, "--limit", "10"])
    assert exit_info.value.code == 2 and "nowhere.ckpt" in capsys.readouterr().err


def test_advtrain_transfer_command_prints_the_matrix(checkpoints, tmp_path):
    from cli_utils import advtrain

    root, paths = checkpoints
    proc = advtrain("transfer", "-c", ROOT / "configs/demo/standard.yaml", "--checkpoints", *paths, "--attack",
                    ATTACK, "--limit", 50, cwd=tmp_path)
    assert "Transfer matrix, pgd-5 eps=0.1, n=50" in proc.stdout
    assert len([line for line in proc.stdout.splitlines() if line.startswith("| ")]) == 3  # header + 2 rows
