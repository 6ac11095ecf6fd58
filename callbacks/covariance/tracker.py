"""Covariance tracking: a running estimate of the covariance Sigma of adversarial perturbations, for SGR (Roth,
Kilcher, Hofmann 2018, eqs. 14-16) and for studying any defense's perturbations (the paper's Fig. 2)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from advtrain.attacks import AttackSetting, attack_mode, seeded_generator
from advtrain.defenses import step_output

from .psd import check_psd_mode
from .sigma import REPRESENTATIONS, Covariance, load_covariance, make_covariance
from .summaries import data_mean_variance, input_shape_of, log_covariance

SOURCES = ("gradient", "sign", "defense", "step_gradient")  # and any training attack of the attack table
SCALES = ("data", "unit", "none")
LARGE_PSD_CHANGE = 0.1  # a relative change of Sigma by its PSD projection worth a warning


class CovarianceTracker(pl.Callback):
    """Sigma <- (1 - beta) Sigma + beta * batch mean of xi xi^T (raw second moments, eq. 15), offered as
    :attr:`covariance` (SGR finds this callback in ``trainer.callbacks`` and reads ``covariance.matvec(g)`` and
    ``.mean``).

    When each hook runs:

    * ``setup("fit")``: builds the estimate over the datamodule's input shape (:mod:`.sigma`: ``full``
      d x d matrix, or ``stationary`` covariance functions, eq. 16) and its scaled Sigma, :attr:`covariance`,
      which is never None from then on. Before the first update Sigma is the identity scaled to the
      target mean diagonal, so SGR starts as GN (our choice: the paper does not say how Sigma starts); the first
      update replaces it by the first batch's moments (beta = 1 once, so no trace of the identity lingers), the
      later ones use ``beta``. With ``scale: data`` the target is the mean per-pixel variance of the first
      ``DATA_EXAMPLES`` (10,000) training inputs without augmentation, the same on every rank.
    * ``on_fit_start``: moves Sigma to the module's device.
    * ``on_train_batch_end``: after the optimizer step, reads the step's output (``outputs["step"]``: ``x``;
      ``perturbation`` = x_adv - x for source ``defense``) and updates Sigma. Updating here, not before the step,
      means the perturbations of sources gradient/sign/fgsm/pgd are those of the weights the *next* step trains,
      which is where the new Sigma is used; and ``defense`` perturbations exist only once the step has run. The
      scaled Sigma (:attr:`covariance`) is rewritten in place (the same object).
    * ``on_train_epoch_end`` and every ``log_every_n_steps`` batches (rank 0): logs the decay lengths
      (``covariance/decay_length_<c><c'>``), the covariance functions as a plot and, for ``full``, the matrix as
      an image (``callbacks/covariance/summaries.py``); these read values back to the host, the updates do not.

    Sources of xi (the paper's: loss gradients, their sign, FGSM or PGD perturbations, crafted with the model's
    predicted label, no label leaking): ``gradient`` / ``sign``: the input gradient of CE at the predicted label
    (or its sign), per example (the gradient of the summed loss in eval mode, so BatchNorm mixes no examples);
    an attack (``fgsm``, ``pgd``, any training attack of the table): its x_adv - x at its budget (default: the
    module's eps) on the predicted label; all crafted with :func:`advtrain.attacks.attack_mode` (eval mode, modes
    restored) under the trainer's precision. An attack's random start draws from a private generator seeded by
    (step, rank), so the tracker
    never moves the training's global RNG. SGR's own ``input_gradient`` (its step output) is not reused: it is taken at
    the true label, before the optimizer step, in train mode. ``defense``: the perturbation the defense made this step.
    ``step_gradient``: that reused gradient (the step output's ``input_gradient``, which SGR returns): free, where
    ``gradient`` costs one more forward and input backward per update (about 1.1 clean steps at CIFAR shape,
    bench/sgr_cost.py), at the price of the true label and train mode (our option, not the paper's; for correctly
    classified examples the label is the prediction, and the sign of g does not enter xi xi^T).

    Under DDP the batch statistics (sums and counts) are summed across ranks before the update (one all_reduce),
    so every rank holds the same Sigma, that of the global batch. The estimate, the counters and the scale target
    are in ``state_dict``: a resumed run continues bitwise.

    Args:
        source: ``gradient``, ``sign``, ``defense``, ``step_gradient``, or an attack: a training attack of the
            attack table, as in an evaluation suite (``fgsm``, ``pgd``, ``{attack: pgd, steps: 10, step: 2/255}``);
            its budget is the module's ``eps`` unless it sets one.
        representation: ``full`` or ``stationary``.
        beta: the EMA rate (paper: 0.1).
        scale: ``data``: Sigma's mean diagonal equals the data's mean variance (arXiv text, default); ``unit``: 1
            (ICLR version); ``none``: the raw moments.
        update_every: update on the first training batch and then every this many batches (the paper: updating
            every step is not needed).
        freeze_after_steps: no updates after this many training batches (Sigma frozen); None: never frozen.
        fixed_path: a torch file with a fixed (d, d) Sigma (``advtrain covariance`` writes the data set's own);
            ``stationary`` keeps its closest stationary covariance. No updates then.
        log_every_n_steps: training batches between TensorBoard logs (and at each epoch's end).
        psd: ``project`` (default): SGR multiplies by Sigma with its negative part removed, so that its
            regularizer is bounded below (``stationary`` Sigmas and ``fixed_path`` matrices can be indefinite;
            :mod:`.psd`); how far that moved Sigma is logged as ``covariance/psd_change``. ``none``: the estimate
            as it is.
    """

    DATA_EXAMPLES = 10_000

    def __init__(self, source: str | dict = "pgd", representation: str = "stationary", beta: float = 0.1,
                 scale: str = "data", update_every: int = 1, freeze_after_steps: int | None = None,
                 fixed_path: str | None = None, log_every_n_steps: int = 50, psd: str = "project"):
        self.attack_entry = None if isinstance(source, str) and source in SOURCES else source
        if self.attack_entry is not None:
            try:  # checked now against the table (with a placeholder budget: the module's comes at setup)
                AttackSetting.from_config(source, None, "CovarianceTracker source").check_training(
                    (), "CovarianceTracker")
            except ValueError as error:
                raise ValueError(f"CovarianceTracker source must be one of {', '.join(SOURCES)} or a training "
                                 f"attack: {error}") from error
            source = source if isinstance(source, str) else source["attack"]
        for name, value, allowed in (("representation", representation, REPRESENTATIONS), ("scale", scale, SCALES)):
            if value not in allowed:
                raise ValueError(f"CovarianceTracker {name} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"CovarianceTracker beta must be in (0, 1], got {beta}")
        for name, value in (("update_every", update_every), ("log_every_n_steps", log_every_n_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CovarianceTracker {name} must be an integer >= 1, got {value!r}")
        if freeze_after_steps is not None and (not isinstance(freeze_after_steps, int) or freeze_after_steps < 0):
            raise ValueError(f"CovarianceTracker freeze_after_steps must be an integer >= 0 or null, got "
                             f"{freeze_after_steps!r}")
        self.psd = check_psd_mode(psd, "CovarianceTracker")
        self.source, self.representation, self.beta, self.scale = source, representation, beta, scale
        self.update_every, self.freeze_after_steps, self.fixed_path = update_every, freeze_after_steps, fixed_path
        self.attack: AttackSetting | None = None  # an attack source with the module's budget, from setup on
        self.log_every_n_steps = log_every_n_steps
        self.estimate: Covariance | None = None  # the running raw moments (the state)
        self.covariance: Covariance | None = None  # what SGR reads: the estimate scaled to the target
        self.target: Tensor | None = None  # the target mean diagonal (None for scale "none")
        self.batches = 0  # training batches seen
        self.updates = 0  # updates made
        self._pending: dict[str, Any] | None = None
        self._warned = False  # about a large PSD projection, once per run

    @property
    def state_key(self) -> str:
        return self._generate_state_key(source=self.source, representation=self.representation)

    # ---- setup ------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        shape = input_shape_of(datamodule)
        self.batches = self.updates = 0  # a new fit starts afresh; a checkpoint's state is loaded after setup
        if self.fixed_path is not None:
            self.estimate = load_covariance(self.fixed_path, self.representation, shape, psd=self.psd)
        else:
            self.estimate = make_covariance(self.representation, shape, psd=self.psd)
        if self.scale == "data":
            self.target = torch.tensor(data_mean_variance(datamodule, self.DATA_EXAMPLES), dtype=torch.float32)
        elif self.scale == "unit":
            self.target = torch.tensor(1.0)
        self.covariance = self.estimate if self.target is None else self.estimate.scaled_to(self.target)
        if self._pending is not None:
            self.load_state_dict(self._pending)
        if self.attack_entry is not None:
            self.attack = self._attack_of(pl_module)

    def _attack_of(self, pl_module) -> AttackSetting:
        """The attack source with the module's budget (unless the source sets its own)."""
        eps = getattr(pl_module, "eps", None)
        if eps is None and not (isinstance(self.attack_entry, dict) and "eps" in self.attack_entry):
            raise ValueError(f"CovarianceTracker source {self.source!r} needs a budget: {type(pl_module).__name__} "
                             "has no eps, so give the source one ({attack: pgd, eps: 8/255})")
        return AttackSetting.from_config(self.attack_entry, eps, "CovarianceTracker source")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._to(pl_module.device)

    def _to(self, device: torch.device) -> None:
        self.estimate.to(device)
        if self.covariance is not self.estimate:
            self.covariance.to(device)
        if self.target is not None:
            self.target = self.target.to(device)

    # ---- updates ------------------------------------------------------------------------------------------
    def due(self) -> bool:
        """Whether the batch just counted updates Sigma (a Python decision on counters: no host sync)."""
        if self.fixed_path is not None:
            return False
        if self.freeze_after_steps is not None and self.batches > self.freeze_after_steps:
            return False
        return (self.batches - 1) % self.update_every == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self.due():
            self.observe(self.perturbations(trainer, pl_module, outputs, batch))
        if trainer.is_global_zero and self.batches % self.log_every_n_steps == 0:
            self._log(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.covariance is not None:
            self._log(trainer)

    def _log(self, trainer) -> None:
        """Write Sigma's summaries; warn once when keeping it positive semi-definite moved it far."""
        change = log_covariance(trainer, self.covariance, trainer.global_step)["covariance/psd_change"]
        if change > LARGE_PSD_CHANGE and not self._warned:
            self._warned = True
            advice = ("these perturbations are far from stationary: representation full estimates them without "
                      "that approximation" if self.representation == "stationary" else "check the fixed Sigma")
            rank_zero_warn(f"CovarianceTracker: keeping Sigma positive semi-definite moved it by {change:.0%} "
                           f"(relative Frobenius norm, logged as covariance/psd_change); {advice}")

    def observe(self, xi: Tensor) -> None:
        """One update from this rank's perturbations xi (B, *shape): batch sums, summed over DDP ranks, then the
        EMA step (beta = 1 on the first update) and the rescaled copy the module reads."""
        stats = self.estimate.batch_statistics(xi)
        stats = all_reduce_sums(stats)
        self.estimate.update_from_statistics(stats, 1.0 if self.updates == 0 else self.beta)
        self.updates += 1
        if self.covariance is not self.estimate:
            self.estimate.scaled_to(self.target, out=self.covariance)

    def perturbations(self, trainer, pl_module, outputs, batch) -> Tensor:
        """This step's xi from the configured source (see the class docstring)."""
        step = step_output(outputs)
        reused = {"defense": ("perturbation", "made no adversarial examples this step"),
                  "step_gradient": ("input_gradient", "returns no input gradient (as advtrain.defenses.SGR does)")}
        if self.source in reused:  # what the training step computed: nothing to craft
            key, missing = reused[self.source]
            value = None if step is None else getattr(step, key)
            if value is None:
                raise ValueError(f"CovarianceTracker source {self.source!r}: {type(pl_module).__name__} {missing} "
                                 f"(its step output has no {key}); choose source gradient, sign or an attack")
            return value
        x = (batch[0] if step is None else step.x).detach()
        network = getattr(pl_module, "network", pl_module)
        bounds = tuple(getattr(pl_module, "input_bounds", (0.0, 1.0)))
        with torch.enable_grad(), attack_mode(network), trainer.precision_plugin.forward_context():
            with torch.no_grad():
                predicted = network(x).argmax(1)  # the paper crafts on the prediction: no label leaking
            if self.source in ("gradient", "sign"):
                x_in = x.clone().requires_grad_(True)
                loss = F.cross_entropy(network(x_in).float(), predicted, reduction="sum")
                (gradient,) = torch.autograd.grad(loss, x_in)
                return gradient if self.source == "gradient" else gradient.sign()
            generator = seeded_generator(x.device, self.batches, trainer.global_rank)
            attack = self.attack or self._attack_of(pl_module)
            return attack.run(network, x, predicted, generator=generator, bounds=bounds) - x

    # ---- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"estimate": None if self.estimate is None else self.estimate.state_dict(), "batches": self.batches,
                "updates": self.updates, "target": None if self.target is None else self.target.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.estimate is None:  # restored before setup: apply once the estimate exists
            self._pending = state_dict
            return
        self._pending = None
        self.batches, self.updates = int(state_dict["batches"]), int(state_dict["updates"])
        if state_dict["estimate"] is not None:
            device = self.estimate.device
            self.estimate.load_state_dict({k: v.to(device) for k, v in state_dict["estimate"].items()})
        if state_dict["target"] is not None:
            self.target = state_dict["target"].to(self.estimate.device)
        if self.covariance is not self.estimate:
            self.estimate.scaled_to(self.target, out=self.covariance)


def all_reduce_sums(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """The statistics summed over the processes of the default group (one all_reduce of one flat buffer), or as
    they are outside distributed runs."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    names = list(stats)
    flat = torch.cat([stats[n].reshape(-1).to(stats["count"].dtype) for n in names])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = {}, 0
    for name in names:
        n = stats[name].numel()
        out[name] = flat[offset:offset + n].reshape(stats[name].shape).to(stats[name].dtype)
        offset += n
    return out


__all__ = ["SOURCES", "SCALES", "CovarianceTracker", "all_reduce_sums"]
