"""advtrain.callbacks.CovarianceTracker: the EMA of a defense's perturbations by hand, the data scaling, the sources
crafted on the predicted label, update_every / freeze / fixed Sigma, TensorBoard output, exact resume after SIGKILL, and
DDP (2 gloo processes: the same Sigma on both ranks, equal to the update on the gathered global batch)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from cli_utils import ROOT, advtrain, config, straight_and_resumed
from helpers import DigitsMLP
from pytorch_lightning.plugins.precision import Precision

from advtrain.attacks import pgd
from advtrain.callbacks import CovarianceTracker
from advtrain.callbacks.covariance import StationaryCovariance, make_covariance
from advtrain.datamodules import Digits
from advtrain.defenses import PGDAT, Standard, StepOutput

FAST = dict(accelerator="cpu", enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
            limit_val_batches=0, max_epochs=1)


class Recorder(pl.Callback):
    """Keeps each step's outputs["step"].perturbation (placed after the tracker, it sees the same step)."""

    def __init__(self):
        self.perturbations = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.perturbations.append(outputs["step"].perturbation.clone())


def digits_variance() -> float:
    """The mean per-pixel variance of the digits training split, from the raw uint8 tensors."""
    dm = Digits()
    dm.setup("fit")
    x = dm.train_set.x.double().flatten(1) / 255
    return float(x.var(0, unbiased=True).mean())


def fit_pgdat(callbacks, batches=4, logger=False, **trainer_args):
    pl.seed_everything(0)
    module = PGDAT(network=DigitsMLP(), eps=0.2, attack={"steps": 2, "step": 0.1})
    trainer = pl.Trainer(**{**FAST, **trainer_args}, limit_train_batches=batches, logger=logger, callbacks=callbacks)
    trainer.fit(module, datamodule=Digits())
    return module, trainer


def test_tracker_is_the_ema_of_the_defense_perturbations_scaled_to_the_data_variance():
    full = CovarianceTracker(source="defense", representation="full", beta=0.3)
    stationary = CovarianceTracker(source="defense", representation="stationary", beta=0.3, scale="unit")
    recorder = Recorder()
    module, _ = fit_pgdat([full, stationary, recorder])
    assert full.updates == stationary.updates == len(recorder.perturbations) == 4
    # by hand: the first batch replaces the identity, then Sigma <- 0.7 Sigma + 0.3 xi^T xi / m
    expected = None
    for xi in recorder.perturbations:
        flat = xi.flatten(1).double()
        moment = flat.T @ flat / len(flat)
        expected = moment if expected is None else 0.7 * expected + 0.3 * moment
    torch.testing.assert_close(full.estimate.matrix.double(), expected, rtol=1e-5, atol=1e-8)
    # what SGR reads (``covariance``): the estimate scaled to the data's mean variance (arXiv)
    variance = digits_variance()
    assert float(full.target) == pytest.approx(variance, rel=1e-5)
    assert float(full.covariance.mean_diagonal()) == pytest.approx(variance, rel=1e-5)
    torch.testing.assert_close(full.covariance.to_dense().double(),
                               expected * variance / expected.diagonal().mean(), rtol=1e-4, atol=1e-7)
    # the stationary tracker saw the same perturbations: its estimate is the full one's stationary projection
    projection = StationaryCovariance.from_dense(expected, (1, 8, 8), dtype=torch.float64).functions
    torch.testing.assert_close(stationary.estimate.functions.double(), projection, rtol=1e-4, atol=1e-7)
    assert float(stationary.covariance.mean_diagonal()) == pytest.approx(1.0, rel=1e-6)  # scale "unit"


def test_sigma_is_there_before_the_first_step_and_starts_as_scaled_identity():
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                tracker = next(cb for cb in trainer.callbacks if isinstance(cb, CovarianceTracker))
                seen.append(tracker.covariance.to_dense().clone())

    tracker = CovarianceTracker(source="defense", representation="stationary")
    fit_pgdat([Probe(), tracker], batches=1)
    torch.testing.assert_close(seen[0], digits_variance() * torch.eye(64), rtol=1e-5, atol=1e-8)


def stub_trainer(datamodule=None, rank=0):
    return SimpleNamespace(datamodule=datamodule, is_global_zero=False, global_step=0, global_rank=rank,
                           precision_plugin=Precision(), loggers=[])


def wrongly_labelled_batch():
    dm = Digits()
    dm.setup("fit")
    x, y = dm.preprocess(dm.train_set.__getitems__(list(range(32))), train=False)
    pl.seed_everything(1)
    network = DigitsMLP()
    network.train()  # the tracker crafts in eval mode and restores the module's own mode
    with torch.no_grad():
        predicted = network(x).argmax(1)
    wrong = (predicted + 1) % 10  # every label differs from the prediction
    return network, x, wrong, predicted


def test_sources_are_crafted_on_the_predicted_label_without_touching_the_global_rng():
    network, x, wrong, predicted = wrongly_labelled_batch()
    module = Standard(network=network, eps=0.1)
    outputs = {"step": StepOutput(x, wrong)}
    trainer = stub_trainer()

    def input_gradient(labels):
        x_in = x.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(network(x_in), labels, reduction="sum"), x_in)[0]

    rng = torch.get_rng_state()
    xi = {}
    for source in ("gradient", "sign", "fgsm", "pgd"):
        configured = {"fgsm": "fgsm", "pgd": {"attack": "pgd", "steps": 3}}.get(source, source)
        xi[source] = CovarianceTracker(source=configured).perturbations(trainer, module, outputs, (x, wrong))
    assert torch.equal(torch.get_rng_state(), rng)
    assert network.training  # mode restored
    truth = input_gradient(predicted)
    torch.testing.assert_close(xi["gradient"], truth)
    assert not torch.allclose(xi["gradient"], input_gradient(wrong))  # the label differs: so would the gradient
    assert torch.equal(xi["sign"], truth.sign())
    torch.testing.assert_close(xi["fgsm"], (x + 0.1 * truth.sign()).clamp(0, 1) - x)
    gen = torch.Generator().manual_seed(1_000_003 * 0 + 0)
    network.eval()
    torch.testing.assert_close(xi["pgd"], pgd(network, x, predicted, 0.1, steps=3, generator=gen) - x)
    assert xi["pgd"].abs().max() <= 0.1 + 1e-6


def test_update_every_freeze_and_fixed_sigma(tmp_path):
    dm = Digits()
    dm.setup("fit")
    trainer = stub_trainer(dm)
    module = Standard(network=DigitsMLP(), eps=0.1)
    tracker = CovarianceTracker(source="defense", representation="full", update_every=3, freeze_after_steps=7,
                                beta=0.5, scale="none")
    tracker.setup(trainer, module, "fit")
    gen = torch.Generator().manual_seed(8)
    batches = [torch.randn(5, 1, 8, 8, generator=gen) for _ in range(10)]
    for i, xi in enumerate(batches):
        tracker.on_train_batch_end(trainer, module, {"step": StepOutput(xi, None, perturbation=xi)}, None, i)
    assert tracker.batches == 10 and tracker.updates == 3  # batches 1, 4 and 7; frozen after 7
    reference = make_covariance("full", (1, 8, 8))
    for k, index in enumerate((0, 3, 6)):
        reference.update(batches[index], 1.0 if k == 0 else 0.5)
    assert torch.equal(tracker.estimate.matrix, reference.matrix)
    assert tracker.covariance is tracker.estimate  # scale "none": the raw moments
    rng = torch.get_rng_state()
    scaled = CovarianceTracker(source="defense")
    scaled.setup(trainer, module, "fit")  # scale "data": reads the training data, leaves the global RNG alone
    assert torch.equal(torch.get_rng_state(), rng)
    assert float(scaled.target) == pytest.approx(digits_variance(), rel=1e-5)

    matrix = torch.cov(torch.rand(100, 64, generator=gen, dtype=torch.float64).T) * 3
    torch.save(matrix, tmp_path / "sigma.pt")
    fixed = CovarianceTracker(source="defense", representation="full", fixed_path=str(tmp_path / "sigma.pt"),
                              scale="unit")
    fixed.setup(trainer, module, "fit")
    before = fixed.covariance.to_dense().clone()
    torch.testing.assert_close(before.double(), matrix / matrix.diagonal().mean(), rtol=1e-5, atol=1e-7)
    fixed.on_train_batch_end(trainer, module, {"step": StepOutput(batches[0], None, batches[0])}, None, 0)
    assert fixed.updates == 0 and torch.equal(fixed.covariance.to_dense(), before)


def test_the_sigma_sgr_reads_is_projected_unless_psd_is_off(tmp_path):
    """The digits' own covariance as a stationary fixed Sigma is indefinite; the tracker hands SGR its projection."""
    dm = Digits()
    dm.setup("fit")
    torch.save(torch.cov(dm.train_set.x.double().flatten(1).T / 255), tmp_path / "digits.pt")
    smallest = {}
    for psd in ("project", "none"):
        tracker = CovarianceTracker(source="defense", fixed_path=str(tmp_path / "digits.pt"), scale="unit", psd=psd)
        tracker.setup(stub_trainer(dm), Standard(network=DigitsMLP(), eps=0.1), "fit")
        values = torch.linalg.eigvalsh(tracker.covariance.to_dense().double())
        smallest[psd] = float(values.min() / values.max())
        assert (float(tracker.covariance.psd_change()) > 0) == (psd == "project")
    assert smallest["none"] < -0.01 and smallest["project"] >= -1e-6


@pytest.mark.parametrize("representation", ["stationary", "full"])
def test_updates_and_sigma_g_make_no_host_sync(counter, representation):
    """What runs every training step (crafting, statistics, EMA, rescaling, the kernel, Sigma g) reads nothing back."""
    dm = Digits()
    dm.setup("fit")
    network, x, wrong, _ = wrongly_labelled_batch()
    module, trainer = Standard(network=network, eps=0.1), stub_trainer(dm)
    tracker = CovarianceTracker(source={"attack": "pgd", "steps": 2}, representation=representation)
    tracker.setup(trainer, module, "fit")
    with counter.counting():
        for i in range(3):
            tracker.on_train_batch_end(trainer, module, {"step": StepOutput(x, wrong)}, (x, wrong), i)
            tracker.covariance.matvec(x)
    assert tracker.updates == 3
    assert not counter.counts, counter.report()


def test_bad_settings_give_one_line_errors():
    with pytest.raises(ValueError, match="source must be one of"):
        CovarianceTracker(source="noise")
    with pytest.raises(ValueError, match="representation must be one of"):
        CovarianceTracker(representation="diagonal")
    with pytest.raises(ValueError, match="beta"):
        CovarianceTracker(beta=0)
    with pytest.raises(ValueError, match="update_every"):
        CovarianceTracker(update_every=0)
    with pytest.raises(ValueError, match="psd must be one of project, none"):
        CovarianceTracker(psd="clip")
    network, x, wrong, _ = wrongly_labelled_batch()
    with pytest.raises(ValueError, match="choose source"):
        CovarianceTracker(source="defense").perturbations(stub_trainer(), Standard(network=network), {"x": x},
                                                          (x, wrong))


def test_tensorboard_gets_decay_lengths_the_functions_plot_and_the_matrix(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    tracker = CovarianceTracker(source="sign", representation="full", log_every_n_steps=2)
    fit_pgdat([tracker], batches=4, logger=logger, log_every_n_steps=2)
    events = EventAccumulator(str(Path(logger.log_dir)), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"covariance/decay_length_00", "covariance/psd_change"} <= set(tags["scalars"])
    assert {"covariance/functions", "covariance/matrix"} <= set(tags["images"])
    lengths = [e.value for e in events.Scalars("covariance/decay_length_00")]
    assert len(lengths) == 3  # steps 2 and 4, and the epoch's end
    assert lengths[-1] == pytest.approx(float(tracker.covariance.decay_lengths()[0, 0]), rel=1e-5)
    assert all(0 < v < 20 and math.isfinite(v) for v in lengths)
    image = events.Images("covariance/matrix")[-1]
    assert (image.width, image.height) == (64, 64)


def test_a_large_psd_projection_is_logged_and_warned_about_once(tmp_path):
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    tracker = CovarianceTracker(source={"attack": "pgd", "steps": 2}, representation="stationary", log_every_n_steps=1)
    with pytest.warns(UserWarning, match="positive semi-definite moved it by .*representation full") as caught:
        fit_pgdat([tracker], batches=3, logger=logger, log_every_n_steps=1)
    assert sum("positive semi-definite" in str(w.message) for w in caught) == 1
    assert float(tracker.covariance.psd_change()) > 0.1  # PGD perturbations of digits: far from stationary


def test_resume_after_sigkill_is_bitwise_equal_sigma_and_its_projection_included(tmp_path):
    """SGR with a stationary Sigma of PGD perturbations: an estimate that the PSD projection moves (logged), so the
    weights match only if the resumed run projects exactly as the straight one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = tmp_path / "tracker.yaml"
    overrides.write_text(
        "trainer:\n  max_epochs: 3\n  limit_train_batches: 4\n  limit_val_batches: 1\n  callbacks:\n"
        "    - class_path: advtrain.callbacks.CovarianceTracker\n"
        "      init_args: {source: {attack: pgd, steps: 2}, representation: stationary, update_every: 2,\n"
        "                  log_every_n_steps: 2}\n"
        "model:\n  init_args:\n    val_attack: {attack: pgd, steps: 2}\n")
    cfg = config("demo/sgr.yaml")
    fast = ["--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", 2]
    a, b, _ = straight_and_resumed(["-c", cfg, "-c", overrides, *fast], 6, tmp_path)
    assert a["global_step"] == b["global_step"] == 12
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    (sa,) = [v for k, v in a["callbacks"].items() if k.startswith("CovarianceTracker")]
    (sb,) = [v for k, v in b["callbacks"].items() if k.startswith("CovarianceTracker")]
    assert sa["batches"] == sb["batches"] == 12 and sa["updates"] == sb["updates"] == 6
    for key in ("values", "mean"):
        assert torch.equal(sa["estimate"][key], sb["estimate"][key]), key
    assert not torch.equal(sa["estimate"]["values"], StationaryCovariance((1, 8, 8)).values)  # it did move
    events = EventAccumulator(str(tmp_path / "runs" / "straight" / "version_0")).Reload()
    assert max(e.value for e in events.Scalars("covariance/psd_change")) > 0.01  # and SGR used its projection


class GlobalBatchReference(pl.Callback):
    """Under DDP: gathers every rank's perturbation of the step, updates a process-local estimate on the global batch
    (no reduction inside), and keeps one on this rank's batch alone; writes them with the tracker's at fit end."""

    def __init__(self, path: str):
        self.path = path
        self.global_estimate = self.local_estimate = None

    def _tracker(self, trainer) -> CovarianceTracker:
        return next(cb for cb in trainer.callbacks if isinstance(cb, CovarianceTracker))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tracker = self._tracker(trainer)
        xi = outputs["step"].perturbation
        gathered = [torch.empty_like(xi) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, xi)
        if self.global_estimate is None:
            self.global_estimate = make_covariance(tracker.representation, tuple(xi.shape[1:]))
            self.local_estimate = make_covariance(tracker.representation, tuple(xi.shape[1:]))
        beta = 1.0 if tracker.updates == 1 else tracker.beta  # the tracker has just made its update
        self.global_estimate.update(torch.cat(gathered), beta)
        self.local_estimate.update(xi, beta)

    def on_fit_end(self, trainer, pl_module):
        torch.save({"tracker": self._tracker(trainer).estimate.state_dict(),
                    "global": self.global_estimate.state_dict(), "local": self.local_estimate.state_dict()},
                   Path(self.path) / f"rank{trainer.global_rank}.pt")


def test_ddp_ranks_hold_the_same_sigma_equal_to_the_global_batch_update(tmp_path):
    overrides = tmp_path / "ddp.yaml"
    overrides.write_text(
        "trainer:\n  max_epochs: 1\n  limit_train_batches: 3\n  limit_val_batches: 0\n  callbacks:\n"
        "    - class_path: advtrain.callbacks.CovarianceTracker\n"
        "      init_args: {source: defense, representation: stationary, beta: 0.5}\n"
        "    - class_path: test_covariance_tracker.GlobalBatchReference\n"
        f"      init_args: {{path: {tmp_path}}}\n"
        "model:\n  init_args:\n    attack: {steps: 2}\n")
    advtrain("fit", "-c", config("demo/pgd_at.yaml"), "-c", overrides, "--trainer.accelerator", "cpu",
             "--trainer.devices", 2, "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_checkpointing", "false", cwd=tmp_path,
             env_extra={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}:{Path(__file__).parent}"})
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("values", "mean"):
        assert torch.equal(r0["tracker"][key], r1["tracker"][key]), key  # bitwise the same on both ranks
        # the one-process update on the gathered global batch (sums in another order: float tolerance)
        np.testing.assert_allclose(r0["tracker"][key].numpy(), r0["global"][key].numpy(), rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(r0["global"][key], r1["global"][key])
    # each rank's own half differs: without the reduction the ranks would disagree
    assert not torch.allclose(r0["local"]["values"], r1["local"]["values"])


def test_step_gradient_source_reuses_the_sgr_steps_own_input_gradients():
    from advtrain.defenses import SGR

    class GradientRecorder(pl.Callback):
        def __init__(self):
            self.gradients = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.gradients.append(outputs["step"].input_gradient.clone())

    tracker = CovarianceTracker(source="step_gradient", representation="full", beta=0.5, scale="none")
    recorder = GradientRecorder()
    pl.seed_everything(0)
    module = SGR(network=DigitsMLP(), lam=0.5, eps=0.2)
    pl.Trainer(**FAST, limit_train_batches=3, logger=False, callbacks=[tracker, recorder]).fit(module,
                                                                                            datamodule=Digits())
    assert tracker.updates == len(recorder.gradients) == 3
    expected = None
    for g in recorder.gradients:
        flat = g.flatten(1).double()
        moment = flat.T @ flat / len(flat)
        expected = moment if expected is None else 0.5 * expected + 0.5 * moment
    torch.testing.assert_close(tracker.estimate.matrix.double(), expected, rtol=1e-5, atol=1e-10)
    # a defense without an input gradient: one clear error
    network, x, wrong, _ = wrongly_labelled_batch()
    with pytest.raises(ValueError, match="returns no input gradient"):
        CovarianceTracker(source="step_gradient").perturbations(stub_trainer(), Standard(network=network),
                                                                {"x": x}, (x, wrong))
