"""SGR, GN and the mixture baseline (defenses/sgr.py, defenses/mixture.py): closed forms, double backprop by finite
differences, per-example gradients under BatchNorm, the predicted label of the mixture, and short digits runs."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from advtrain.attacks import fgsm, pgd
from advtrain.datamodules import Digits
from advtrain.defenses import GN, SGR, MixtureAT
from advtrain.networks import DigitsCNN


class DenseCovariance:
    """The tracker's Sigma interface (matvec, mean) over an explicit d x d matrix: an independent reference."""

    def __init__(self, matrix, mean=None):
        self.matrix = matrix
        self.mean = torch.zeros(matrix.shape[0], dtype=matrix.dtype) if mean is None else mean

    def matvec(self, g):
        return (g.flatten(1) @ self.matrix.T).view_as(g)


class OneLayer(nn.Module):
    """f(x) = W flatten(x) + b: the paper's one-layer softmax classifier."""

    def __init__(self, d=16, classes=4):
        super().__init__()
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(x.flatten(1))


class TanhNet(nn.Module):
    """A smooth two-layer net (tanh: non-zero second derivatives, so double backprop matters everywhere)."""

    def __init__(self, d=16, hidden=5, classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(x))


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x))


class BatchNormNet(nn.Module):
    def __init__(self, track_running_stats=True):
        super().__init__()
        norm = nn.BatchNorm2d(4, track_running_stats=track_running_stats)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), norm, nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 16, 3)

    def forward(self, x):
        return self.head(self.body(x))


def random_spd(d, generator, dtype=torch.float64):
    a = torch.randn(d, d, generator=generator, dtype=dtype)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=dtype)


def inputs(batch=6, classes=4, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 4, 4, generator=generator, dtype=dtype)
    y = torch.randint(0, classes, (batch,), generator=generator)
    return x, y, generator


def test_omega_equals_the_one_layer_closed_form():
    # eq. 13 for f = Wx + b: grad_x log p_y = W^T (e_y - p), so Omega = 1/2 mean_i (W^T(e_y - p_i))^T Sigma (...)
    x, y, generator = inputs()
    network = OneLayer().double()
    sigma = random_spd(16, generator)
    mu = torch.randn(16, generator=generator, dtype=torch.float64)
    model = SGR(network, lam=0.7, uncentred=True)
    model.fixed_covariance = DenseCovariance(sigma, mu)
    out = model.defense_loss(x, y, 0)
    W, b = network.head.weight.detach(), network.head.bias.detach()
    p = torch.softmax(x.flatten(1) @ W.T + b, dim=1)
    g = (F.one_hot(y, 4).double() - p) @ W  # (B, d)
    omega = 0.5 * torch.einsum("bi,ij,bj->b", g, sigma, g).mean()
    mean_term = -(g @ mu).mean()
    ce = -torch.log(p[torch.arange(len(y)), y]).mean()
    torch.testing.assert_close(out.parts["omega"], omega)
    torch.testing.assert_close(out.parts["mean_term"], mean_term)
    torch.testing.assert_close(out.parts["ce"], ce)
    torch.testing.assert_close(out.loss, ce + 0.7 * (omega + mean_term))
    torch.testing.assert_close(out.input_gradient.flatten(1), g)
    assert out.parts["lam"] == torch.tensor(0.7) and out.parts["lam"].device.type == "cpu"


def test_omega_equals_the_logit_form_on_a_nonlinear_network():
    # eq. 13: Omega = 1/2 mean (grad phi_y - sum_k p_k grad phi_k)^T Sigma (...), the logit Jacobian per example
    x, y, generator = inputs(classes=3)
    network = TanhNet().double()
    sigma = random_spd(16, generator)
    model = SGR(network, lam=1.0)
    model.fixed_covariance = DenseCovariance(sigma)
    out = model.defense_loss(x, y, 0)
    terms = []
    for i in range(len(y)):
        jac = torch.autograd.functional.jacobian(lambda v: network(v.view(1, 1, 4, 4))[0], x[i].flatten())  # (K, d)
        p = torch.softmax(network(x[i:i + 1])[0], 0).detach()
        v = jac[y[i]] - p @ jac
        terms.append(0.5 * v @ sigma @ v)
    torch.testing.assert_close(out.parts["omega"], torch.stack(terms).mean())


def test_compile_is_refused_in_one_line_naming_the_double_backward():
    """torch.compile's aot_autograd has no double backward: SGR and GN would fail on their first step."""
    for defense in (SGR, GN):
        with pytest.raises(ValueError, match="double backward.*compile false"):
            defense(DigitsCNN(width=4, hidden=16), compile=True)


def test_gn_equals_sgr_with_an_identity_covariance(batch):
    x, y = batch
    torch.manual_seed(0)
    network = DigitsCNN(width=4, hidden=16)
    gn, sgr = GN(network, lam=0.3), SGR(network, lam=0.3)
    sgr.fixed_covariance = DenseCovariance(torch.eye(64))
    results = []
    for model in (gn, sgr):
        network.zero_grad()
        out = model.defense_loss(x, y, 0)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in network.parameters()]))
    (gn_out, gn_grads), (sgr_out, sgr_grads) = results
    assert gn_out.parts["omega"] > 0
    torch.testing.assert_close(gn_out.loss, sgr_out.loss)
    torch.testing.assert_close(gn_out.parts["omega"], sgr_out.parts["omega"])
    for a, b in zip(gn_grads, sgr_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_weight_gradient_of_the_sgr_loss_matches_finite_differences():
    x, y, generator = inputs(classes=3, seed=1)
    torch.manual_seed(1)
    network = TanhNet().double()
    model = SGR(network, lam=2.0)
    model.fixed_covariance = DenseCovariance(random_spd(16, generator))
    network.zero_grad()
    model.defense_loss(x, y, 0).loss.backward()
    h = 1e-6
    with torch.no_grad():
        for param in network.parameters():
            analytic = param.grad.clone()
            numeric = torch.zeros_like(param)
            for j in range(param.numel()):
                value = param.view(-1)[j].item()
                param.view(-1)[j] = value + h
                plus = model.defense_loss(x, y, 0).loss
                param.view(-1)[j] = value - h
                minus = model.defense_loss(x, y, 0).loss
                param.view(-1)[j] = value
                numeric.view(-1)[j] = (plus - minus) / (2 * h)
            torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_without_double_backprop_the_weight_gradient_would_differ():
    # the finite-difference test above can fail: the CE gradient alone (what a detached g would give) is different
    x, y, generator = inputs(classes=3, seed=1)
    network = TanhNet().double()
    model = SGR(network, lam=2.0)
    model.fixed_covariance = DenseCovariance(random_spd(16, generator))
    network.zero_grad()
    model.defense_loss(x, y, 0).loss.backward()
    full = network.head.weight.grad.clone()
    network.zero_grad()
    F.cross_entropy(network(x), y).backward()
    assert (full - network.head.weight.grad).abs().max() > 1e-4


def test_ce_and_the_gradient_share_one_dropout_mask(batch):
    x, y = batch
    network = DropoutMLP()
    model = GN(network, lam=1.0)
    torch.manual_seed(3)
    out = model.defense_loss(x, y, 0)
    torch.manual_seed(3)  # the same single dropout draw, by hand
    xr = x.clone().requires_grad_(True)
    logits = network(xr)
    ce = F.cross_entropy(logits, y)
    (g,) = torch.autograd.grad(-ce * len(y), xr)
    torch.testing.assert_close(out.parts["ce"], ce)
    torch.testing.assert_close(out.input_gradient, g)


def test_batchnorm_gradients_are_each_examples_own():
    x, y, _ = inputs(batch=5, classes=3, dtype=torch.float32, seed=2)
    torch.manual_seed(2)
    network = BatchNormNet()
    model = GN(network, lam=1.0)
    network.train()
    out = model.defense_loss(x, y, 0)
    bn = network.body[1]
    assert bn.training and int(bn.num_batches_tracked) == 1  # the CE forward updated the statistics once
    g = out.input_gradient
    network.eval()
    for i in range(len(y)):  # one example alone, BatchNorm on its (updated) running statistics
        xi = x[i:i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(-F.cross_entropy(network(xi), y[i:i + 1]), xi)
        torch.testing.assert_close(g[i:i + 1], gi, rtol=1e-4, atol=1e-6)
    # what the check guards against: the train-mode gradient of the summed log-likelihood mixes examples
    network.train()
    xm = x.clone().requires_grad_(True)
    (mixed,) = torch.autograd.grad(-F.cross_entropy(network(xm), y, reduction="sum"), xm)
    assert (mixed - g).abs().max() > 1e-3
    # and the CE term is the ordinary train-mode one
    network.train()
    torch.testing.assert_close(out.parts["ce"], F.cross_entropy(out.logits_clean, y))


def test_batchnorm_refusals():
    x, y, _ = inputs(batch=4, classes=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="batchnorm: eval"):
        GN(BatchNormNet(), batchnorm="error").defense_loss(x, y, 0)
    with pytest.raises(ValueError, match="running statistics"):
        GN(BatchNormNet(track_running_stats=False)).defense_loss(x, y, 0)
    model = GN(BatchNormNet(), batchnorm="error")
    model.network.eval()  # eval-mode BatchNorm is per-example: allowed
    assert torch.isfinite(model.defense_loss(x, y, 0).loss)


@pytest.mark.parametrize("bad", [dict(sigma="full"), dict(lam=-1.0), dict(batchnorm="train")])
def test_bad_sgr_settings_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SGR(OneLayer(), **bad)


@pytest.mark.parametrize("bad,message", [(dict(lam=1.5), "lam"), (dict(attack="deepfool"), "not a training attack"),
                                         (dict(attack={"attack": "pgd", "steps": 0}), "steps")])
def test_bad_mixture_settings_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        MixtureAT(OneLayer(), **bad)


def dropout_net(seed=0):
    torch.manual_seed(seed)
    return DropoutMLP()


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_mixture_crafts_on_the_predicted_label_in_eval_mode(batch, attack):
    x, _ = batch
    network = dropout_net()
    with torch.no_grad():
        predicted = network.eval()(x).argmax(1)
    y = (predicted + 1) % 10  # every label differs from the prediction
    setting = {"attack": "pgd", "steps": 3, "step": 0.05} if attack == "pgd" else {"attack": "fgsm"}
    run = (lambda labels: fgsm(network, x, labels, 0.1)) if attack == "fgsm" else \
        (lambda labels: pgd(network, x, labels, 0.1, steps=3, step=0.05))
    torch.manual_seed(5)
    on_prediction = run(predicted)
    torch.manual_seed(5)
    on_label = run(y)
    model = MixtureAT(network, lam=0.25, attack=setting, eps=0.1)
    network.train()
    torch.manual_seed(5)
    out = model.defense_loss(x, y, 0)
    assert network.body[3].training  # the defense restored train mode
    torch.testing.assert_close(out.x_adv, on_prediction)
    assert (out.x_adv - on_label).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.5
    assert out.x_adv.min() >= 0 and out.x_adv.max() <= 1 and (out.x_adv - x).abs().max() <= 0.1 + 1e-6
    expected = 0.75 * F.cross_entropy(out.logits_clean, y) + 0.25 * F.cross_entropy(out.logits_adv, y)
    torch.testing.assert_close(out.loss, expected)


class SetCovariance(pl.Callback):
    """Stands in for callbacks.CovarianceTracker: offers a fixed Sigma as ``covariance``; records the step outputs."""

    def __init__(self, covariance=None):
        self.covariance, self.outputs = covariance, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)


def fit(tmp_path, model, callbacks, batches=4):
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, inference_mode=False,
                         limit_train_batches=batches, limit_val_batches=1, num_sanity_val_steps=0,
                         callbacks=callbacks)
    trainer.fit(model, datamodule=Digits(batch_size=32))
    return trainer


@pytest.mark.parametrize("sigma", ["identity", "tracked"])
def test_short_digits_run_logs_finite_parts(tmp_path, sigma):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    covariance = DenseCovariance(random_spd(64, generator, torch.float32)) if sigma == "tracked" else None
    recorder = SetCovariance(covariance)
    model = SGR(DigitsCNN(width=4, hidden=16), lam=0.5, sigma=sigma, eps=0.1, val_attack={"steps": 2})
    before = model.network.head.weight.detach().clone()
    trainer = fit(tmp_path, model, [recorder])
    metrics = trainer.callback_metrics
    for name in ("train/loss", "train/ce", "train/omega", "train/lam"):
        assert torch.isfinite(metrics[name]), name
    assert metrics["train/omega"] > 0 and metrics["train/lam"] == 0.5
    assert len(recorder.outputs) == 4
    assert recorder.outputs[-1]["step"].input_gradient.shape == recorder.outputs[-1]["step"].x.shape
    assert not torch.equal(before, model.network.head.weight)


def test_mixture_short_digits_run(tmp_path):
    torch.manual_seed(0)
    recorder = SetCovariance()
    model = MixtureAT(DigitsCNN(width=4, hidden=16), attack={"attack": "pgd", "steps": 2}, eps=0.1,
                      val_attack={"steps": 2})
    trainer = fit(tmp_path, model, [recorder], batches=2)
    for name in ("train/ce_clean", "train/ce_adv", "train/acc_adv"):
        assert torch.isfinite(trainer.callback_metrics[name]), name
    perturbation = recorder.outputs[-1]["step"].perturbation
    assert perturbation.abs().max() <= 0.1 + 1e-6 and perturbation.abs().max() > 0


@pytest.mark.parametrize("settings", [dict(sigma="tracked"), dict(sigma="identity", uncentred=True)])
def test_fit_without_the_tracker_names_it(tmp_path, settings):
    model = SGR(DigitsCNN(width=4, hidden=16), eps=0.1, val_attack={"steps": 2}, **settings)
    with pytest.raises(ValueError, match="advtrain.callbacks.CovarianceTracker"):
        fit(tmp_path, model, [], batches=1)


@pytest.mark.parametrize("representation", ["stationary", "full"])
def test_sgr_trains_with_the_covariance_tracker(tmp_path, representation):
    from advtrain.callbacks import CovarianceTracker

    torch.manual_seed(0)
    tracker = CovarianceTracker(source="gradient", representation=representation, scale="unit", log_every_n_steps=100)
    model = SGR(DigitsCNN(width=4, hidden=16), lam=0.5, uncentred=True, eps=0.1, val_attack={"steps": 2})
    trainer = fit(tmp_path, model, [tracker], batches=3)
    assert model.covariance is tracker.covariance and tracker.updates == 3
    for name in ("train/ce", "train/omega", "train/mean_term"):
        assert torch.isfinite(trainer.callback_metrics[name]), name
    # the logged Omega is the one of the Sigma the tracker held at the last step (dense reference, same g)
    dm = trainer.datamodule
    x, y = dm.preprocess(dm.train_set.__getitems__(list(range(32))), train=False)
    out = model.defense_loss(x, y, 0)
    g = out.input_gradient.flatten(1)
    dense = model.covariance.to_dense()
    torch.testing.assert_close(out.parts["omega"], 0.5 * torch.einsum("bi,ij,bj->b", g, dense, g).mean(),
                               rtol=1e-4, atol=1e-7)


def test_the_uncentred_mean_term_stays_float32_under_bf16_autocast(batch):
    """-mean_i g_i^T mu is a matrix product: under a bf16-mixed trainer's autocast it would run in bf16 although g
    was widened to float32."""
    x, y = batch
    torch.manual_seed(0)
    model = SGR(DigitsCNN(width=4, hidden=16), lam=0.5, uncentred=True)
    model.fixed_covariance = DenseCovariance(torch.eye(64), mean=torch.randn(64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.defense_loss(x, y, 0)
    g = out.input_gradient.flatten(1).float()
    expected = -(g @ model.fixed_covariance.mean).mean()
    assert out.parts["mean_term"].dtype == torch.float32
    assert torch.equal(out.parts["mean_term"], expected)
