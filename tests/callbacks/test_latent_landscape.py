"""LossLandscape in latent space (ADR supplementary Figs. 1-2): the analytic surface of a linear latent model,
the callback's adversarial centre, files and figures, thetas, bad arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import LatentMLP
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from advtrain.callbacks import LossLandscape, landscape_directions, loss_surface
from advtrain.datamodules import Digits
from advtrain.defenses import Standard
from advtrain.evaluation.landscape import LatentHead
from advtrain.networks.tensorize import tensorize

A = np.array([[0.5, -1.0, 0.2, 0.7], [0.3, 0.8, -0.4, 0.1], [-0.6, 0.2, 0.9, -0.3]])
W = np.array([[1.0, -2.0, 0.5], [-0.7, 0.4, 1.5], [0.2, 0.9, -0.6]])
C = np.array([0.1, -0.3, 0.25])


class LinearLatent(nn.Module):
    """z = A x, logits = W z + c."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Linear(4, 3, bias=False)
        self.head = nn.Linear(3, 3)
        with torch.no_grad():
            self.encode.weight.copy_(torch.tensor(A))
            self.head.weight.copy_(torch.tensor(W))
            self.head.bias.copy_(torch.tensor(C))

    def forward_with_latent(self, x):
        z = self.encode(x)
        return z, self.head(z)

    def logits_from_latent(self, z):
        return self.head(z)

    def forward(self, x):
        return self.forward_with_latent(x)[1]


def cross_entropy(logits: np.ndarray, y: int) -> float:
    m = logits.max()
    return float(m + np.log(np.exp(logits - m).sum()) - logits[y])


def test_latent_surface_of_a_linear_model_is_the_analytic_cross_entropy():
    net, y = LinearLatent(), 1
    x = np.array([0.3, -0.2, 0.8, 0.1])
    z = torch.tensor(A @ x, dtype=torch.float32)
    head = LatentHead(net)
    e1, e2 = landscape_directions(head, z, y, seed=4)
    logits = W @ (A @ x) + C
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    grad = W.T @ (p - np.eye(3)[y])  # d CE / dz, not d CE / dx (which would be A^T of it)
    a, b = e1.double().numpy(), e2.double().numpy()
    np.testing.assert_allclose(a, grad / np.abs(grad).max(), atol=1e-6)
    assert abs(a @ b) < 1e-6 and np.abs(b).max() == pytest.approx(1.0)
    alphas, betas = np.linspace(-1, 1, 5), np.linspace(-1, 1, 3)
    surface = loss_surface(head, z, y, e1, e2, alphas, betas)
    expected = [[cross_entropy(W @ (A @ x + al * a + be * b) + C, y) for be in betas] for al in alphas]
    np.testing.assert_allclose(surface.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="no forward_with_latent"):
        LatentHead(nn.Linear(4, 3))


def test_both_spaces_around_the_adversarial_example(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = Standard(network=LatentMLP(), eps=0.3)
    landscape = LossLandscape(points=[0, 5, 9], grid=5, space="both", around="adversarial", latent_span=2.0,
                              attack={"attack": "fgsm", "eps": 0.1})
    trainer = pl.Trainer(accelerator="cpu", enable_progress_bar=False, logger=TensorBoardLogger(tmp_path, name="r"),
                         callbacks=[landscape])
    trainer.test(model, datamodule=Digits(), verbose=False)
    out = tmp_path / "r" / "version_0" / "landscape"
    stems = {f"point{p}{s}_theta1.png" for p in (0, 5, 9) for s in ("", "_latent")}
    assert {f.name for f in out.glob("*.png")} == stems
    results = json.loads((out / "landscape.json").read_text())
    assert results["attack"] == "fgsm eps=0.1" and results["latent_alphas"][0] == -2.0
    events = EventAccumulator(str(tmp_path / "r" / "version_0"))
    events.Reload()
    assert "landscape/point5/latent/theta1" in events.Tags()["images"]

    # independent reference: FGSM by hand, the latent of x_a, the gradient direction in z
    data = Digits()
    net = model.network.eval()
    batch = torch.utils.data.default_collate([data.eval_dataset("test")[i] for i in (0, 5, 9)])
    x, y = data.preprocess(batch, train=False)
    point = x.clone().requires_grad_(True)
    F.cross_entropy(net(point), y, reduction="sum").backward()
    x_adv = (x + 0.1 * point.grad.sign()).clamp(0, 1)
    with torch.no_grad():
        z_adv, logits_adv = net.forward_with_latent(x_adv)
    mid = 2
    for k, entry in enumerate(results["points"]):
        assert entry["adversarial_prediction"] == int(logits_adv[k].argmax())
        assert entry["attack_succeeded"] == (int(logits_adv[k].argmax()) != int(y[k]))
        at_x_adv = float(F.cross_entropy(logits_adv[k:k + 1], y[k:k + 1]))
        inputs, latent = np.array(entry["thetas"]["1"]["loss"]), np.array(entry["latent"]["thetas"]["1"]["loss"])
        assert inputs.shape == latent.shape == (5, 5) and entry["latent"]["latent_dim"] == 16
        # both surfaces are centred on the adversarial example: the same loss at their origins
        assert inputs[mid, mid] == pytest.approx(at_x_adv, rel=1e-5)
        assert latent[mid, mid] == pytest.approx(at_x_adv, rel=1e-5)
        zk = z_adv[k].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net.head(zk)[None], y[k:k + 1]), zk)
        e1 = (g / g.abs().max()).detach()
        with torch.no_grad():
            along = [float(F.cross_entropy(net.head(z_adv[k] + a * e1)[None], y[k:k + 1])) for a in (-2, -1, 1, 2)]
        np.testing.assert_allclose(latent[[0, 1, 3, 4], mid], along, rtol=1e-4)
    assert {e["attack_succeeded"] for e in results["points"]} == {True, False}  # both kinds shown


def test_latent_only_with_thetas_of_a_tensorized_network(tmp_path):
    torch.manual_seed(0)
    net = tensorize(LatentMLP(), theta=0.9)
    landscape = LossLandscape(points=[2], grid=3, space="latent", thetas=[1.0, 0.5], draws=2)
    trainer = pl.Trainer(accelerator="cpu", enable_progress_bar=False, logger=False, default_root_dir=tmp_path,
                         callbacks=[landscape])
    trainer.test(Standard(network=net, eps=0.1), datamodule=Digits(), verbose=False)
    entry = landscape.results["points"][0]
    assert "thetas" not in entry and set(entry["latent"]["thetas"]) == {"1", "0.5"}
    one, half = entry["latent"]["thetas"]["1"], entry["latent"]["thetas"]["0.5"]
    assert one["draws"] == 1 and half["draws"] == 2 and one["loss"] != half["loss"]
    assert landscape.results["attack"].startswith("pgd-10") and "eps=0.1" in landscape.results["attack"]
    assert {f.name for f in (tmp_path / "landscape").glob("*.png")} == {"point2_latent_theta1.png",
                                                                        "point2_latent_theta0.5.png"}


def test_network_without_a_latent_interface_is_a_clear_error(tmp_path):
    from helpers import DigitsMLP

    trainer = pl.Trainer(accelerator="cpu", enable_progress_bar=False, logger=False, default_root_dir=tmp_path,
                         callbacks=[LossLandscape(points=[0], grid=3, space="latent")])
    with pytest.raises(TypeError, match="DigitsMLP has no forward_with_latent"):
        trainer.test(Standard(network=DigitsMLP(), eps=0.1), datamodule=Digits(), verbose=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"space": "z"}, "space"), ({"around": "x"}, "around"), ({"latent_span": 0}, "latent_span"),
    ({"attack": {"attack": "pgdd"}}, "pgdd"), ({"attack": {"attack": "pgd", "eps": [0.1, 0.2]}}, "one eps"),
])
def test_bad_latent_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossLandscape(**kwargs)
