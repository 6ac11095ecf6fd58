"""LossLandscape: analytic surface of a linear model, files and TensorBoard figures, thetas, bad arguments."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import DigitsMLP
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from advtrain.callbacks import LossLandscape, landscape_directions, loss_surface
from advtrain.datamodules import Digits
from advtrain.defenses import Standard
from advtrain.networks.tensorize import tensorize
from advtrain.networks.tucker import keep_probability

W = np.array([[1.0, -2.0, 0.5, 0.3], [-0.7, 0.4, 1.5, -1.0], [0.2, 0.9, -0.6, 1.1]])
C = np.array([0.1, -0.3, 0.25])
X = np.array([0.3, -0.2, 0.8, 0.1])


def linear_model() -> nn.Linear:
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(W))
        model.bias.copy_(torch.tensor(C))
    return model


def cross_entropy(z: np.ndarray, y: int) -> float:
    m = z.max()
    return float(m + np.log(np.exp(z - m).sum()) - z[y])


@pytest.mark.parametrize("normalize", ["linf", "l2"])
def test_linear_model_surface_is_the_analytic_cross_entropy(normalize):
    model, y = linear_model(), 2
    x = torch.tensor(X, dtype=torch.float32)
    d1, d2 = landscape_directions(model, x, y, seed=3, normalize=normalize)

    z = W @ X + C
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    grad = W.T @ (p - np.eye(3)[y])  # d CE / dx
    a, b = d1.double().numpy(), d2.double().numpy()
    assert np.allclose(a, grad / (np.abs(grad).max() if normalize == "linf" else np.linalg.norm(grad)), atol=1e-6)
    assert abs(a @ b) < 1e-6 * np.linalg.norm(a) * np.linalg.norm(b)
    norm = (lambda v: np.abs(v).max()) if normalize == "linf" else np.linalg.norm
    assert norm(a) == pytest.approx(1.0, abs=1e-6) and norm(b) == pytest.approx(1.0, abs=1e-6)

    alphas, betas = np.linspace(-0.5, 0.5, 5), np.linspace(-0.5, 0.5, 7)
    surface = loss_surface(model, x, y, d1, d2, alphas, betas, batch_size=4)  # several batches
    expected = np.array([[cross_entropy(W @ (X + al * a + be * b) + C, y) for be in betas] for al in alphas])
    assert surface.shape == (5, 7)
    np.testing.assert_allclose(surface.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # the loss rises along the gradient direction and the clean loss sits at the centre
    assert surface[-1, 3] > surface[2, 3] > surface[0, 3]
    assert float(surface[2, 3]) == pytest.approx(cross_entropy(z, y), rel=1e-5)


def test_eval_mode_during_the_landscape_and_each_mode_restored_after():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model[2].eval()  # a submodule with its own mode: it must come back, not a blanket train()
    reference = copy.deepcopy(model).eval()
    x = torch.tensor(X, dtype=torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    d1, d2 = landscape_directions(model, x, 0)  # BatchNorm in training mode would reject a batch of one
    point = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(reference(point[None]), torch.tensor([0])).backward()
    torch.testing.assert_close(d1, point.grad / point.grad.abs().max())
    surface = loss_surface(model, x, 0, d1, d2, [-5.0, 0.0, 5.0], [0.0, 1.0])  # far outside any valid range
    inputs = torch.stack([x + a * d1 + b * d2 for a in (-5.0, 0.0, 5.0) for b in (0.0, 1.0)])
    expected = nn.functional.cross_entropy(reference(inputs), torch.zeros(6, dtype=torch.long), reduction="none")
    torch.testing.assert_close(surface, expected.detach().view(3, 2))
    assert [m.training for m in model] == [True, True, False, True]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN statistics untouched


def tiny_tucker_mlp() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return tensorize(net, theta=0.9).eval()


def test_tensorized_surfaces_differ_across_thetas_and_theta_one_is_deterministic():
    net = tiny_tucker_mlp()
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1))
    d1, d2 = landscape_directions(net, x, 4, seed=0)
    axis = torch.linspace(-0.5, 0.5, 7)
    with keep_probability(net, 1.0):
        one = loss_surface(net, x, 4, d1, d2, axis, axis)
        again = loss_surface(net, x, 4, d1, d2, axis, axis)
    assert torch.equal(one, again)
    rng = torch.get_rng_state()
    with keep_probability(net, 0.5):
        half = loss_surface(net, x, 4, d1, d2, axis, axis, draws=3, seed=7)
        half_again = loss_surface(net, x, 4, d1, d2, axis, axis, draws=3, seed=7)
        other_seed = loss_surface(net, x, 4, d1, d2, axis, axis, draws=3, seed=8)
    assert torch.equal(torch.get_rng_state(), rng)  # seeded draws leave the global RNG alone
    assert torch.equal(half, half_again) and not torch.equal(half, other_seed)
    assert (half - one).abs().max() > 1e-3
    # the directions come from theta = 1 whatever the layer's own theta is
    with keep_probability(net, 0.3):
        assert all(torch.equal(a, b) for a, b in zip(landscape_directions(net, x, 4, seed=0), (d1, d2)))
    assert all(layer.theta == 0.9 for layer in net.modules() if hasattr(layer, "theta"))


def test_callback_writes_pngs_json_and_tensorboard_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    net = DigitsMLP()
    tensorize(net, theta=0.9)
    model = Standard(network=net, eps=0.1)
    landscape = LossLandscape(points=[0, 7], thetas=[1.0, 0.5], grid=5, draws=2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[landscape])
    trainer.fit(model, datamodule=Digits())
    out = tmp_path / "run" / "version_0" / "landscape"
    names = {f"point{p}_theta{t}.png" for p in (0, 7) for t in ("1", "0.5")}
    assert {f.name for f in out.glob("*.png")} == names
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    results = json.loads((out / "landscape.json").read_text())
    assert results["stage"] == "fit" and len(results["alphas"]) == 5
    assert [p["index"] for p in results["points"]] == [0, 7]
    for point in results["points"]:
        assert point["thetas"]["1"]["draws"] == 1 and point["thetas"]["0.5"]["draws"] == 2
        assert np.array(point["thetas"]["0.5"]["loss"]).shape == (5, 5)
        assert point["thetas"]["1"]["loss"] != point["thetas"]["0.5"]["loss"]
    events = EventAccumulator(str(tmp_path / "run" / "version_0"))
    events.Reload()
    assert set(events.Tags()["images"]) == {f"landscape/point{p}/theta{t}" for p in (0, 7) for t in ("1", "0.5")}

    # the test hook writes too (here: into the test run's own folder), same numbers for the same weights
    trainer = pl.Trainer(accelerator="cpu", enable_progress_bar=False, logger=False, default_root_dir=tmp_path / "t",
                         callbacks=[LossLandscape(points=[0, 7], thetas=[1.0, 0.5], grid=5, draws=2)])
    trainer.test(model, datamodule=Digits(), verbose=False)
    tested = json.loads((tmp_path / "t" / "landscape" / "landscape.json").read_text())
    assert tested["stage"] == "test" and tested["points"] == results["points"]
    # a second evaluation into the same folder never replaces the first one's files
    first = (tmp_path / "t" / "landscape" / "landscape.json").read_text()
    trainer.test(model, datamodule=Digits(), verbose=False)
    assert (tmp_path / "t" / "landscape" / "landscape.json").read_text() == first
    assert json.loads((tmp_path / "t" / "landscape-2" / "landscape.json").read_text())["points"] == results["points"]


def test_plain_network_warns_and_uses_theta_one(tmp_path):
    landscape = LossLandscape(points=[3], thetas=[0.5, 1.0], grid=3, after_fit=False)
    trainer = pl.Trainer(accelerator="cpu", enable_progress_bar=False, logger=False, default_root_dir=tmp_path,
                         callbacks=[landscape])
    with pytest.warns(UserWarning, match="no Tucker layers"):
        trainer.test(Standard(network=DigitsMLP(), eps=0.1), datamodule=Digits(), verbose=False)
    assert landscape.results["thetas"] == [1.0]
    assert {f.name for f in (tmp_path / "landscape").glob("*.png")} == {"point3_theta1.png"}


@pytest.mark.parametrize("kwargs, match", [
    ({"grid": 1}, "grid"), ({"span": 0}, "span"), ({"span": -0.5}, "span"), ({"thetas": [0.0]}, "theta"),
    ({"thetas": [1.5]}, "theta"), ({"thetas": []}, "theta"), ({"normalize": "l1"}, "normalize"),
    ({"points": []}, "points"), ({"points": [-1]}, "points"), ({"draws": 0}, "draws"), ({"split": "train"}, "split"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossLandscape(**kwargs)


def test_out_of_range_point_is_a_clear_error(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", enable_progress_bar=False, logger=False, default_root_dir=tmp_path,
                         callbacks=[LossLandscape(points=[0, 5000], grid=3)])
    with pytest.raises(ValueError, match=r"points \[5000\] are out of range"):
        trainer.test(Standard(network=DigitsMLP(), eps=0.1), datamodule=Digits(), verbose=False)
