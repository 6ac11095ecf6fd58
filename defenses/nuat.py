"""NuAT: nuclear-norm adversarial training (Sriramanan et al., NeurIPS 2021; official code val-iisc/NuAT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advtrain.attacks import AttackSetting, attack_mode, nuclear_norm, parse_budget

from .base import AdversarialDefense
from .outputs import DefenseOutput


class LinearRamp:
    """lambda(epoch) = lambda_max * min(epoch, ramp_epochs) / ramp_epochs, constant within an epoch.

    The official scripts start at 0 and add lambda_max / ramp_epochs after each epoch while epoch < ramp_epochs:
    ``NuAT_WA_cifar10.py`` and the NuAT2 scripts with ``ramp_epochs = max_epochs`` (lambda never quite reaches
    lambda_max), ``NuAT_cifar10.py`` with ``ramp_epochs = max_epochs - 10`` (4.5 from epoch 90 of 100 on).
    """

    def __init__(self, max_value: float, ramp_epochs: int):
        if ramp_epochs < 1:
            raise ValueError(f"ramp_epochs must be >= 1, got {ramp_epochs}")
        self.max_value, self.ramp_epochs = float(max_value), int(ramp_epochs)

    def __call__(self, epoch: int) -> float:
        return self.max_value * min(epoch, self.ramp_epochs) / self.ramp_epochs


class NuAT(AdversarialDefense):
    """Training loss CE(f(x), y) + lambda * ||f(x~) - f(x)||_* / B (no CE on x~), x~ from the
    nuclear-norm attack; lambda ramps up linearly (:class:`LinearRamp`, logged as ``train/lambda``).

    Variants (the paper's names):
      * NuAT: ``attack_steps=1``.  NuAT-WA: add the ``advtrain.callbacks.EMA`` callback (tau 0.9998).
      * NuAT2: ``attack_steps=2`` (a nuclear step then a CE step, eps each).
      * NuAT2-WA: ``attack_steps=2, attack_on_ema=True`` with ``advtrain.callbacks.EMA(attack_decay=0.99)``: the
        first step is taken on the fast EMA network (from the second epoch on).
      * NuAT-H (hybrid): ``two_step_from_epoch=N``: single-step epochs, then two-step ones from epoch N
        (``two_step_nuclear_every=1``: those use the nuclear term on every minibatch, as NuAT2).

    The official scripts' learning-rate schedules are :class:`~advtrain.defenses.schedules.CyclicLRInEpochs`.

    Args:
        lambda_max: final lambda (4.5 for NuAT on ResNet-18, 4 for the others).
        lambda_ramp_epochs: epochs to reach lambda_max (default: trainer.max_epochs, as NuAT_WA_cifar10.py and
            the NuAT2 scripts; NuAT_cifar10.py uses max_epochs - 10).
        start_scale: a of the Bernoulli start +-a (4/255 CIFAR, 0.3 MNIST).
        nuclear_every: use the nuclear term in the attack on every n-th minibatch (the official NuAT scripts
            alternate: 2; the odd batches of an epoch get it); 1 uses it always (the official NuAT2 scripts).
        two_step_nuclear_every: ``nuclear_every`` in the two-step epochs of NuAT-H (1: NuAT2's rule); default:
            ``nuclear_every``.
    """

    def __init__(self, *args, lambda_max: float = 4.0, lambda_ramp_epochs: int | None = None,
                 start_scale: float | str = "4/255", attack_steps: int = 1, two_step_from_epoch: int | None = None,
                 attack_on_ema: bool = False, nuclear_every: int = 2, two_step_nuclear_every: int | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if lambda_max < 0:
            raise ValueError(f"lambda_max must be >= 0, got {lambda_max}")
        if attack_steps not in (1, 2):
            raise ValueError(f"attack_steps must be 1 or 2, got {attack_steps}")
        if two_step_from_epoch is not None and two_step_from_epoch < 0:
            raise ValueError(f"two_step_from_epoch must be >= 0, got {two_step_from_epoch}")
        for name, every in (("nuclear_every", nuclear_every), ("two_step_nuclear_every", two_step_nuclear_every)):
            if every is not None and every < 1:
                raise ValueError(f"{name} must be >= 1, got {every}")
        self.lambda_max, self.lambda_ramp_epochs = lambda_max, lambda_ramp_epochs
        self.start_scale = parse_budget(start_scale, "start_scale")
        # the attack table's rows for NuAT's one-step and two-step attacks; the epoch decides which one runs
        self.attacks = {steps: AttackSetting.from_config({"attack": row, "start_scale": self.start_scale}, self.eps,
                                                         "NuAT attack")
                        for steps, row in ((1, "nuclear"), (2, "nuclear_two_step"))}
        self.attack_steps, self.two_step_from_epoch = attack_steps, two_step_from_epoch
        self.attack_on_ema, self.nuclear_every = attack_on_ema, nuclear_every
        self.two_step_nuclear_every = two_step_nuclear_every

    @property
    def lambda_schedule(self) -> LinearRamp:
        ramp = self.lambda_ramp_epochs or (self.trainer.max_epochs if self._trainer is not None else None) or 1
        return LinearRamp(self.lambda_max, ramp)

    def current_lambda(self) -> float:
        return self.lambda_schedule(self.current_epoch)

    def steps_this_epoch(self) -> int:
        if self.two_step_from_epoch is not None and self.current_epoch >= self.two_step_from_epoch:
            return 2
        return self.attack_steps

    def nuclear_every_this_epoch(self) -> int:
        if self.two_step_nuclear_every is not None and self.steps_this_epoch() == 2:
            return self.two_step_nuclear_every
        return self.nuclear_every

    def fast_ema_network(self):
        if not self.attack_on_ema:
            return None
        ema = self.callback_with("attack_network")  # callbacks.EMA
        if ema is None or ema.attack_decay is None:
            raise RuntimeError("attack_on_ema needs the advtrain.callbacks.EMA callback with attack_decay set "
                               "(e.g. trainer.callbacks: [{class_path: advtrain.callbacks.EMA, init_args: "
                               "{decay: 0.9998, attack_decay: 0.99}}])")
        return ema.attack_network()

    def make_adversarial(self, x, y, clean_logits, lam, batch_idx):
        every = self.nuclear_every_this_epoch()
        use_nuclear = batch_idx % every == every - 1  # the official scripts: the odd batches of an epoch
        common = dict(clean_logits=clean_logits, lam=lam, use_nuclear=use_nuclear, bounds=self.input_bounds)
        if self.steps_this_epoch() == 1:
            with attack_mode(self.network):
                return self.attacks[1].run(self.network, x, y, **common)
        # two steps: as in the official NuAT2 / NuAT2-WA code, the first step's clean logits come from the
        # network that takes it (the fast EMA, or the current network in the first epoch), in eval mode
        first = self.fast_ema_network() or self.network
        with attack_mode(self.network), attack_mode(first):
            with torch.no_grad():
                first_logits = first(x)
            return self.attacks[2].run(self.network, x, y, first_model=first, first_clean_logits=first_logits,
                                       **common)

    def defense_loss(self, x, y, batch_idx):
        lam = self.current_lambda()
        logits_clean = self.network(x)
        x_adv = self.make_adversarial(x, y, logits_clean.detach(), lam, batch_idx)
        logits_adv = self.network(x_adv)
        ce = F.cross_entropy(logits_clean.float(), y)
        nuclear = nuclear_norm(logits_adv.float() - logits_clean.float()) / x.shape[0]
        loss = ce + lam * nuclear
        # lambda goes to the log as a CPU tensor: Lightning turns a Python float into a tensor ON THE DEVICE, a
        # blocking host-to-device copy every step, while a CPU tensor is logged without touching the GPU
        # (tests/defenses/test_host_syncs.py counts it)
        return DefenseOutput(loss, {"ce": ce, "nuclear": nuclear, "lambda": torch.tensor(lam)}, logits_clean,
                             logits_adv, x_adv)
