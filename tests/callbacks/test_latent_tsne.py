"""LatentTSNE: files (PNG, JSON, TensorBoard figure and projector), attack outcomes on a constructed case,
reproducibility with its seed, EOT on randomized networks, rank-zero-only work, bad arguments."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import LatentMLP
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from advtrain.callbacks import LatentTSNE
from advtrain.datamodules import Digits
from advtrain.defenses import Standard
from advtrain.evaluation.latent_tsne import latents, plot_embedding, prediction_entropy, select_points
from advtrain.networks.tensorize import tensorize


class MeanThreshold(nn.Module):
    """Two classes, logits (s, -s) with s = 10 (mean pixel - 0.5); z = the flattened input. An L-inf attack of
    budget eps moves the mean by at most eps, and FGSM (every pixel's gradient has the same sign) by exactly
    eps: it flips a point iff |mean - 0.5| < eps (away from the [0, 1] clamp)."""

    num_classes = 2

    def forward_with_latent(self, x):
        z = x.flatten(1)
        s = 10 * (z.mean(1, keepdim=True) - 0.5)
        return z, torch.cat([s, -s], 1)

    def forward(self, x):
        return self.forward_with_latent(x)[1]


class Tensors(pl.LightningDataModule):
    """A test split held as tensors (no preprocess): what the callback needs of a datamodule."""

    def __init__(self, x, y):
        super().__init__()
        self.dataset = TensorDataset(x, y)

    def eval_dataset(self, split):
        return self.dataset

    def test_dataloader(self):
        return DataLoader(self.dataset, batch_size=64)


def quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, **kwargs)


def test_fit_and_test_write_png_json_tensorboard_figures_and_projector(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = Standard(network=LatentMLP(), eps=0.2)
    tsne = LatentTSNE(num_points=24, epochs=[0, 1], attack={"attack": "pgd", "steps": 3}, batch_size=10)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0,
                            logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[tsne])
    trainer.fit(model, datamodule=Digits())
    run = tmp_path / "run" / "version_0"
    out = run / "latent_tsne"
    assert {f.name for f in out.iterdir()} == {"epoch0.png", "epoch0.json", "epoch1.png", "epoch1.json"}
    assert (out / "epoch1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "epoch1.json").read_text())
    n = 24
    assert results["indices"] == select_points(len(Digits().eval_dataset("test")), n, 0)
    assert np.array(results["coords"]).shape == (2 * n, 2) and results["kind"][n - 1:n + 1] == ["clean", "adversarial"]
    assert results["attack_setting"]["eps"] == pytest.approx(0.2)  # the module's eps by default
    assert results["attack_setting"]["steps"] == 3 and results["attack_setting"]["eot_samples"] == 1
    assert results["draws"] == 1 and results["epoch"] == 1

    # the same latents, computed here independently, are what the projector got
    data = Digits()
    x, y = data.preprocess(torch.utils.data.default_collate(
        [data.eval_dataset("test")[i] for i in results["indices"]]), train=False)
    model.network.eval()
    with torch.no_grad():
        z, logits = model.network.forward_with_latent(x)
    assert results["labels"][:n] == y.tolist()
    assert results["prediction"][:n] == logits.argmax(1).tolist()
    events = EventAccumulator(str(run))
    events.Reload()
    assert set(events.Tags()["images"]) == {"latent_tsne/epoch0", "latent_tsne/epoch1"}
    projector = (run / "projector_config.pbtxt").read_text()
    assert projector.count("embeddings {") == 2 and "sprite" in projector
    folders = sorted(p for p in run.glob("0000*/*") if p.is_dir())
    assert len(folders) == 2
    tensors = np.loadtxt(folders[-1] / "tensors.tsv", delimiter="\t")
    np.testing.assert_allclose(tensors[:n], z.numpy(), rtol=1e-4, atol=1e-5)
    rows = (folders[-1] / "metadata.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["class", "kind", "attack", "prediction", "entropy"]
    assert len(rows) == 2 * n + 1 and rows[1].split("\t")[:3] == [str(int(y[0])), "clean", "-"]
    outcome = ["succeeded" if s else "failed" for s in results["attack_succeeded"]]
    assert [r.split("\t")[2] for r in rows[n + 1:]] == outcome
    assert (folders[-1] / "sprite.png").exists()

    # test: in the test run's folder; a second test never replaces the first one's files
    for _ in range(2):
        tester = quiet_trainer(logger=False, default_root_dir=tmp_path / "t",
                               callbacks=[LatentTSNE(num_points=24, attack={"attack": "pgd", "steps": 3})])
        tester.test(model, datamodule=Digits(), verbose=False)
    assert {f.name for f in (tmp_path / "t" / "latent_tsne").glob("*.png")} == {"test.png", "test-2.png"}


def constructed_case():
    means = np.array([0.2, 0.25, 0.3, 0.35, 0.42, 0.45, 0.48, 0.52, 0.55, 0.58, 0.65, 0.7, 0.75, 0.8] * 2)
    noise = torch.rand(len(means), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.1 - 0.05
    x = torch.tensor(means, dtype=torch.float32).view(-1, 1, 1, 1) + noise - noise.mean((1, 2, 3), keepdim=True)
    y = torch.tensor((means < 0.5).astype(np.int64))  # the model's own clean prediction: every point is correct
    return x, y, np.abs(means - 0.5) < 0.1


def test_successful_and_failed_attacks_are_marked_on_a_constructed_case(tmp_path):
    x, y, flips = constructed_case()
    tsne = LatentTSNE(num_points=20, attack={"attack": "fgsm", "eps": 0.1}, perplexity=5)
    trainer = quiet_trainer(logger=False, default_root_dir=tmp_path, callbacks=[tsne])
    trainer.test(Standard(network=MeanThreshold(), eps=0.3), datamodule=Tensors(x, y), verbose=False)
    results, n = tsne.results, 20
    chosen = results["indices"]
    assert len(chosen) == n and 0 < flips[chosen].sum() < n  # both outcomes are in the drawn set
    assert results["attack_setting"]["eps"] == 0.1 and all(results["clean_correct"])
    assert results["attack_succeeded"] == flips[chosen].tolist()
    expected_adv = np.where(flips[chosen], 1 - y[chosen].numpy(), y[chosen].numpy())
    assert results["prediction"][n:] == expected_adv.tolist()
    # entropy of the two-class softmax of s = 10 (mean - 0.5), computed by hand
    for rows, inputs in ((slice(0, n), x[chosen]), (slice(n, 2 * n), None)):
        if inputs is None:  # FGSM moved every pixel by exactly 0.1 towards the other class
            inputs = x[chosen] + 0.1 * torch.where(y[chosen] == 0, -1.0, 1.0).view(-1, 1, 1, 1)
        p = 1 / (1 + np.exp(-20 * (inputs.double().mean((1, 2, 3)).numpy() - 0.5)))
        hand = -(p * np.log(p) + (1 - p) * np.log(1 - p))
        np.testing.assert_allclose(results["entropy"][rows], hand, rtol=1e-3, atol=1e-5)

    # the figure: every group's scatter holds exactly its points, in both panels
    coords = np.array(results["coords"])
    fig = plot_embedding(coords, results["labels"], results["entropy"], results["kind"],
                         [False] * n + results["attack_succeeded"], "t")
    success = np.array(results["attack_succeeded"])
    expected = {"clean": coords[:n], "adversarial, attack succeeded": coords[n:][success],
                "adversarial, attack failed": coords[n:][~success]}
    for ax in fig.axes[:2]:
        groups = {c.get_label(): c for c in ax.collections}
        assert set(groups) == set(expected)
        for label, points in expected.items():
            np.testing.assert_allclose(groups[label].get_offsets(), points)
        assert groups["adversarial, attack succeeded"].get_paths()[0] != groups["clean"].get_paths()[0]
    assert (tmp_path / "latent_tsne" / "test.png").exists()


def test_same_seed_same_embedding_and_global_rng_untouched(tmp_path):
    torch.manual_seed(0)
    model = Standard(network=LatentMLP(), eps=0.1)

    def run(seed):
        tsne = LatentTSNE(num_points=30, seed=seed, attack={"attack": "pgd", "steps": 2}, projector=False)
        trainer = quiet_trainer(logger=False, default_root_dir=tmp_path / str(seed), callbacks=[tsne])
        trainer.test(model, datamodule=Digits(), verbose=False)
        state = torch.get_rng_state()
        again = tsne.run(trainer, model, name="again")  # a direct call: the global RNG must be left as it was
        assert torch.equal(torch.get_rng_state(), state)
        assert again["coords"] == tsne.results["coords"]
        return again

    first, second, other = run(0), run(0), run(1)
    assert first["coords"] == second["coords"] and first["indices"] == second["indices"]
    assert first["indices"] != other["indices"] and first["coords"] != other["coords"]


def test_randomized_network_is_attacked_with_eot_and_averaged_over_draws(tmp_path):
    torch.manual_seed(0)
    net = tensorize(LatentMLP(), theta=0.5)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert not torch.equal(net(x), net(x))  # the premise: a randomized network
    tsne = LatentTSNE(num_points=10, attack={"attack": "pgd", "steps": 2}, draws=3, eot=4, projector=False)
    trainer = quiet_trainer(logger=False, default_root_dir=tmp_path, callbacks=[tsne])
    trainer.test(Standard(network=net, eps=0.1), datamodule=Digits(), verbose=False)
    assert tsne.results["randomized"] and tsne.results["draws"] == 3
    assert tsne.results["attack_setting"]["eot_samples"] == 4 and "eot4" in tsne.results["attack"]
    # latents(): the mean over seeded draws, reproducible, and one draw of a deterministic net is its forward
    z1, p1 = latents(net, x, draws=3, seed=5)
    z2, p2 = latents(net, x, draws=3, seed=5)
    assert torch.equal(z1, z2) and torch.equal(p1, p2)
    assert torch.allclose(p1.sum(1), torch.ones(3))
    plain = LatentMLP().eval()
    z, p = latents(plain, x)
    torch.testing.assert_close(z, plain.body(x))
    torch.testing.assert_close(p, plain(x).softmax(1))
    # an attack without EOT cannot attack a randomized network honestly
    bad = LatentTSNE(num_points=4, attack={"attack": "autoattack", "eps": 0.1})
    with pytest.raises(ValueError, match="randomized.*EOT"):
        bad.setting(SimpleNamespace(eps=0.1), randomized=True)


def test_entropy_is_shannon_in_nats():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    expected = [0.0, np.log(2), -(0.2 * np.log(0.2) + 0.3 * np.log(0.3) + 0.5 * np.log(0.5))]
    np.testing.assert_allclose(prediction_entropy(p).numpy(), expected, rtol=1e-6)


def test_only_rank_zero_computes_and_every_rank_meets_at_the_barrier(tmp_path):
    calls = []
    tsne = LatentTSNE(num_points=4)
    tsne.compute = lambda *a: (_ for _ in ()).throw(AssertionError("rank 1 must not compute"))

    class Rank1:
        is_global_zero = False
        default_root_dir = str(tmp_path)
        strategy = SimpleNamespace(barrier=lambda *a: calls.append("barrier"))

        @property
        def log_dir(self):  # a collective under DDP: every rank must ask
            calls.append("log_dir")
            return str(tmp_path)

    assert tsne.run(Rank1(), None, name="epoch0") is None
    assert calls == ["log_dir", "barrier"] and not any(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs, match", [
    ({"num_points": 1}, "num_points"), ({"draws": 0}, "draws"), ({"eot": 0}, "eot"), ({"split": "train"}, "split"),
    ({"epochs": [-1]}, "epochs"), ({"perplexity": 0}, "perplexity"), ({"attack": {"attack": "pgdd"}}, "pgdd"),
    ({"attack": {"attack": "pgd", "eps": [0.1, 0.2]}}, "one eps"), ({"dirname": "../x"}, "dirname"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatentTSNE(**kwargs)
