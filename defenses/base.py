"""The base LightningModule every defense derives from."""

from __future__ import annotations

from dataclasses import replace

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from advtrain.attacks import ATTACKS, AttackSetting, attack_mode, is_randomized, parse_budget, seeded_generator

from .outputs import DefenseOutput, StepOutput
from .rng import gathered_rng_states, set_rng_states
from .schedules import PerBatchLR


def describe_network(network: nn.Module) -> str:
    """``Tensorized(DigitsCNN)``: the network's class with the classes of the networks it wraps."""
    inner = getattr(network, "network", None)
    name = type(network).__name__
    return f"{name}({describe_network(inner)})" if isinstance(inner, nn.Module) else name


def num_classes_of(network: nn.Module) -> int:
    head = getattr(network, "head", None)
    if isinstance(getattr(head, "out_features", None), int):  # nn.Linear, or its Tucker / binary versions
        return head.out_features
    if hasattr(network, "num_classes"):
        return int(network.num_classes)
    raise ValueError(f"cannot tell how many classes {type(network).__name__} predicts: give it a "
                     "`head` (nn.Linear) or a `num_classes` attribute")


class AdversarialDefense(pl.LightningModule):
    """Owns the network, optimizer and LR scheduler; logs every loss term, clean and adversarial
    training accuracy, and clean and robust validation accuracy.

    A subclass implements :meth:`defense_loss` (the loss of one batch and its named parts).

    Args:
        network: the classifier; it takes inputs in their natural range and normalizes inside.
        optimizer: a callable ``params -> Optimizer`` (config: ``class_path: torch.optim.SGD``);
            default SGD lr 0.1, momentum 0.9, weight decay 5e-4.
        lr_scheduler: a callable ``optimizer -> scheduler``; stepped per epoch, except schedules written in epochs
            but stepped every batch (:class:`~advtrain.defenses.schedules.PerBatchLR`: ``CyclicLRInEpochs``,
            ``PiecewiseLinearLR``), which learn the number of batches per epoch when training starts.
        eps: the threat model's Linf budget (training attack and validation), e.g. "8/255".
        val_attack: the validation attack (``val/acc_robust``), a setting of the attack table as in an evaluation
            suite: ``{attack: pgd, steps: 10}`` (the default), NuAT's 7-step I-FGSM ``{attack: bim, steps: 7,
            step: 8/1785}``; its budget is ``eps`` unless it sets one.
        val_seed: seeds the validation attack's random start per batch with a private generator, so
            validation is reproducible and never consumes the global RNG (exact resume).
        val_draws: for a network with test-time randomness (two forward passes of one input differ, e.g. Tucker
            layers with theta < 1), ``val/acc_clean``, ``val/acc_robust`` and ``test/acc_clean`` are the mean over
            this many forward passes, never one (checked once, on the first validation or test batch).
        val_eot: for such a network the validation attack averages each input gradient over this many forward
            passes (EOT, Athalye et al. 2018), so the best checkpoint is chosen by an honest robust accuracy.
        channels_last: convert the network and its 4-D inputs to channels_last (faster convs on GPUs).
        compile: ``torch.compile`` the network in place (state_dict keys stay the same).
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        eps: float | str = "8/255",
        val_attack: dict | str | None = None,
        val_seed: int = 0,
        val_draws: int = 10,
        val_eot: int = 10,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.network = network
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.eps = parse_budget(eps, "eps")
        self.val_setting = AttackSetting.from_config(val_attack, self.eps, "val_attack",
                                                     default={"attack": "pgd", "steps": 10})
        if self.val_setting.required_context():
            raise ValueError(f"val_attack: {self.val_setting.attack} runs in training only; choose an attack that "
                             "an evaluation runs, e.g. {attack: pgd, steps: 10}")
        self.val_seed = val_seed
        for name, value in (("val_draws", val_draws), ("val_eot", val_eot)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if val_eot > 1 and not self.val_setting.spec.eot:
            raise ValueError(f"val_eot: the validation attack {self.val_setting.attack} has no EOT; choose one of "
                             f"{', '.join(n for n, spec in ATTACKS.items() if spec.eot)}, or val_eot: 1")
        self.val_draws, self.val_eot = val_draws, val_eot
        self._randomized: bool | None = None  # test-time randomness, probed on the first evaluated batch
        self.channels_last = channels_last
        self.compile_network = compile
        classes = num_classes_of(network)
        # validate_args=False: the inputs are ours, the network's (B, classes) logits and labels that every datamodule
        # checks or builds in 0..classes-1 when it loads them. Validation would run torch.unique on every update: a
        # host-device sync per metric per step (tests/defenses/test_host_syncs.py, tests/integration/test_gpu.py).
        self.train_acc_clean = MulticlassAccuracy(classes, average="micro", validate_args=False)
        self.train_acc_adv = MulticlassAccuracy(classes, average="micro", validate_args=False)
        self.val_acc_clean = MulticlassAccuracy(classes, average="micro", validate_args=False)
        self.val_acc_robust = MulticlassAccuracy(classes, average="micro", validate_args=False)
        self.test_acc_clean = MulticlassAccuracy(classes, average="micro", validate_args=False)
        self.loaded_checkpoint: dict | None = None  # epoch and step of the checkpoint the weights came from

    # ---- the one method a defense implements -------------------------------------------------
    def defense_loss(self, x: Tensor, y: Tensor, batch_idx: int) -> DefenseOutput:
        """The loss of one training batch and its named parts (``x`` prepared for the network, ``batch_idx`` the
        batch's index in its epoch)."""
        raise NotImplementedError(f"{type(self).__name__} must implement defense_loss")

    def callback_with(self, attribute: str):
        """The trainer's first callback that offers ``attribute`` (the EMA's ``attack_network``, the covariance
        tracker's ``covariance``), or None: what a defense needs from a callback it looks up there."""
        trainer = self._trainer
        return None if trainer is None else next((cb for cb in trainer.callbacks if hasattr(cb, attribute)), None)

    # ---- helpers -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.network(self.prepare_input(x))

    def prepare_input(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.network.to(memory_format=torch.channels_last)
        if self.compile_network and not getattr(self, "_compiled", False):
            self.network.compile()
            self._compiled = True

    # ---- Lightning hooks -----------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        """The defense's loss, logged; returns ``{"loss": ..., "step": StepOutput}`` (what callbacks read)."""
        x, y = batch
        x = self.prepare_input(x)
        out = self.defense_loss(x, y, batch_idx)
        self.log("train/loss", out.loss, prog_bar=True)
        for name, value in out.parts.items():
            self.log(f"train/{name}", value)
        if out.logits_adv is not None:
            self.train_acc_adv(out.logits_adv.detach(), y)
            self.log("train/acc_adv", self.train_acc_adv, on_step=True, on_epoch=True)
        logits_clean = out.logits_clean
        if logits_clean is None and batch_idx % max(1, self.trainer.log_every_n_steps) == 0:
            # a defense that trains on adversarial inputs only: measure clean accuracy on logging
            # steps only (one extra forward, in eval mode so BatchNorm statistics stay untouched)
            with torch.no_grad(), attack_mode(self.network):
                logits_clean = self.network(x)
        if logits_clean is not None:
            self.train_acc_clean(logits_clean.detach(), y)
            self.log("train/acc_clean", self.train_acc_clean, on_step=True, on_epoch=True, prog_bar=True)
        return {"loss": out.loss, "step": StepOutput.of(x, y, out)}

    @property
    def input_bounds(self) -> tuple[float, float]:
        """The datamodule's natural input range (attacks clamp to it): [0, 1] images, [-1, 1] audio."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return tuple(getattr(datamodule, "input_bounds", (0.0, 1.0)))

    def evaluation_draws(self, x: Tensor) -> int:
        """Forward passes per input for validation and test: ``val_draws`` for a randomized network, else 1."""
        if self._randomized is None:
            # the probe must not consume the global RNG (a tensorized network's masks draw from it): a resumed run
            # probes at another point than an uninterrupted one and must still continue bitwise
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                self._randomized = is_randomized(self.network, x)
        return self.val_draws if self._randomized else 1

    def _validation_attack(self, network: nn.Module, x: Tensor, y: Tensor, batch_idx: int, draws: int) -> Tensor:
        setting = self.val_setting if draws == 1 else replace(self.val_setting, eot=self.val_eot)
        # the evaluation loop runs under no_grad (trainer.inference_mode must be False)
        with torch.enable_grad(), attack_mode(network):
            generator = seeded_generator(x.device, self.val_seed, batch_idx)
            return setting.run(network, x, y, generator=generator, bounds=self.input_bounds)

    def validation_networks(self) -> dict[str, nn.Module]:
        """Networks to validate besides ``self.network``, from the callbacks that offer them (the EMA: the raw
        weights while the average is validated), by name (logged as ``val/acc_*_<name>``)."""
        trainer = self._trainer
        networks = {}
        for callback in trainer.callbacks if trainer is not None else []:
            networks.update(getattr(callback, "validation_networks", dict)())
        return networks

    def validation_step(self, batch, batch_idx):
        x, y = batch
        x = self.prepare_input(x)
        draws = self.evaluation_draws(x)
        with torch.no_grad():
            for _ in range(draws):
                self.val_acc_clean(self.network(x), y)
        x_adv = self._validation_attack(self.network, x, y, batch_idx, draws)
        with torch.no_grad():
            for _ in range(draws):
                self.val_acc_robust(self.network(x_adv), y)
        self.log("val/acc_clean", self.val_acc_clean, prog_bar=True)
        self.log("val/acc_robust", self.val_acc_robust, prog_bar=True)
        for name, network in self.validation_networks().items():
            x_adv = self._validation_attack(network, x, y, batch_idx, draws)
            with torch.no_grad(), attack_mode(network):
                clean_ok = sum((network(x).argmax(1) == y).float().mean() for _ in range(draws)) / draws
                robust_ok = sum((network(x_adv).argmax(1) == y).float().mean() for _ in range(draws)) / draws
            self.log(f"val/acc_clean_{name}", clean_ok, batch_size=len(y), sync_dist=True)
            self.log(f"val/acc_robust_{name}", robust_ok, batch_size=len(y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        x = self.prepare_input(x)
        with torch.no_grad():
            for _ in range(self.evaluation_draws(x)):
                self.test_acc_clean(self.network(x), y)
        self.log("test/acc_clean", self.test_acc_clean)

    def configure_optimizers(self):
        params = self.parameters()
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer

        def steps_per_epoch() -> float:
            # asked only by schedulers written in epochs but stepped every batch (the estimate loads the data)
            max_epochs = self.trainer.max_epochs
            if max_epochs is None or max_epochs < 1:
                raise ValueError("a learning-rate schedule stepped every batch needs trainer.max_epochs to be set")
            return self.trainer.estimated_stepping_batches / max_epochs

        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, PerBatchLR):
            scheduler.set_steps_per_epoch(steps_per_epoch())
        interval = "step" if isinstance(scheduler, PerBatchLR) else "epoch"
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    # exact resume: the global RNG states (data order, augmentation, random starts) of every rank travel with the
    # checkpoint. Lightning runs its sanity check inside isolate_rng, so restoring here is exact.
    def on_save_checkpoint(self, checkpoint):
        checkpoint["rng_states"] = gathered_rng_states()  # a collective under DDP: Lightning dumps on every rank
        checkpoint["network"] = describe_network(self.network)  # named when a config builds another network

    def on_load_checkpoint(self, checkpoint):
        # which weights these are, for results files (a test run itself starts at step 0)
        self.loaded_checkpoint = {"epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}
        if "rng_states" in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            set_rng_states(checkpoint["rng_states"])


