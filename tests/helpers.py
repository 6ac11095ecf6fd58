"""Helpers that tests plug into real runs through the CLI, and the small digits network many tests train."""

from __future__ import annotations

import os
import signal
import signal as signal_module

import pytorch_lightning as pl
from torch import nn


class DigitsMLP(nn.Module):
    """flatten -> Linear(64, hidden) -> ReLU -> head Linear(hidden, 10): the smallest network with a ``head``."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.body(x))


class KillAtStep(pl.Callback):
    """SIGKILL the process when training reaches ``step``: an interruption with no chance to clean up."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class FailAt(pl.Callback):
    """Raise ``RuntimeError`` when ``hook`` (``train`` or ``test``) starts: a run that fails after its setup."""

    def __init__(self, hook: str = "train"):
        self.hook = hook

    def on_train_start(self, trainer, pl_module):
        if self.hook == "train":
            raise RuntimeError("simulated failure at train start")

    def on_test_start(self, trainer, pl_module):
        if self.hook == "test":
            raise RuntimeError("simulated failure at test start")


class LatentMLP(nn.Module):
    """flatten -> Linear(64, 16) -> ReLU = z -> head: the networks' latent interface on the smallest network."""

    latent_dim = 16

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward_with_latent(self, x):
        z = self.body(x)
        return z, self.head(z)

    def logits_from_latent(self, z):
        return self.head(z)

    def forward(self, x):
        return self.forward_with_latent(x)[1]


def every_defense(width: int, hidden: int, steps: int) -> dict:
    """name -> factory of each defense with a small DigitsCNN(width, hidden) and ``steps``-step attacks, for the
    host-sync checks (tests/defenses/test_host_syncs.py on CPU, tests/integration/test_gpu.py on CUDA). A factory
    returns the module, or (module, the callbacks it needs)."""
    from advtrain.callbacks import EMA, CovarianceTracker
    from advtrain.defenses import ADR, GN, PGDAT, SGR, TRADES, MixtureAT, NuAT, Standard
    from advtrain.networks import DigitsCNN, Tensorized

    def network():
        return DigitsCNN(width=width, hidden=hidden)

    return {
        "Standard": lambda: Standard(network=network()),
        "PGDAT-pgd": lambda: PGDAT(network=network(), eps=0.1, attack={"attack": "pgd", "steps": steps}),
        "PGDAT-fgsm_rs": lambda: PGDAT(network=network(), eps=0.1, attack="fgsm_rs"),
        "TRADES": lambda: TRADES(network=network(), eps=0.1, attack={"step": 0.03, "steps": steps}),
        # nuclear_every=2: consecutive batches attack with and without the nuclear term (both paths run); the
        # loss has it on both
        "NuAT": lambda: NuAT(network=network(), eps=0.1, start_scale=0.05, nuclear_every=2, lambda_ramp_epochs=1),
        "NuAT2": lambda: NuAT(network=network(), eps=0.1, start_scale=0.05, attack_steps=2, nuclear_every=2,
                              lambda_ramp_epochs=1),
        "Tensorized-PGDAT": lambda: PGDAT(network=Tensorized(network(), theta=0.9), eps=0.1,
                                          attack={"attack": "pgd", "steps": steps}),
        "ADR": lambda: ADR(network=network(), eps=0.1, attack={"steps": steps}, gsmt=1.0),  # every term on
        "GN": lambda: GN(network=network(), lam=1.0, eps=0.1),
        # SGR with the tracker's stationary Sigma (its FFT matvec in the step; the update runs after the step)
        "SGR": lambda: (SGR(network=network(), lam=1.0, eps=0.1),
                        [CovarianceTracker(source="step_gradient", representation="stationary")]),
        "MixtureAT-pgd": lambda: MixtureAT(network=network(), eps=0.1, attack={"attack": "pgd", "steps": steps}),
        # the weight averages are updated in the callback's on_train_batch_end, after every step
        "NuAT-WA": lambda: (NuAT(network=network(), eps=0.1, start_scale=0.05, nuclear_every=2, lambda_ramp_epochs=1),
                            [EMA(decay=0.9)]),
        "NuAT2-WA": lambda: (NuAT(network=network(), eps=0.1, start_scale=0.05, attack_steps=2, nuclear_every=2,
                                  lambda_ramp_epochs=1), [EMA(decay=0.9, attack_decay=0.5)]),
    }


class SignalAtStep(pl.Callback):
    """Send ``signal`` to this very process when training reaches ``step`` (on rank ``rank`` only, or on every
    rank): a real signal through the real handlers, at a known point of the run."""

    def __init__(self, step: int, signal: str = "SIGUSR1", rank: int | None = None):
        self.step, self.signum, self.rank = step, getattr(signal_module, signal), rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


class SignalAtTestStart(pl.Callback):
    """Send SIGUSR1 to this process when a test starts, once: the file ``once`` records that it was sent."""

    def __init__(self, once: str):
        self.once = once

    def on_test_start(self, trainer, pl_module):
        if not os.path.exists(self.once):
            open(self.once, "w").close()
            os.kill(os.getpid(), signal_module.SIGUSR1)


class DistinctRankStreams(pl.Callback):
    """Seed each process's global generators differently (1000 + rank), so that a resume that hands one rank
    another's random streams shows."""

    def setup(self, trainer, pl_module, stage):
        import torch

        torch.manual_seed(1000 + trainer.global_rank)


class RecordBatches(pl.Callback):
    """Write, per rank, the bytes of every training example of the first epoch (one line per example, hex) to
    ``<folder>/rank<r>.txt``: which examples each process trained on."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0:
            with open(os.path.join(self.folder, f"rank{trainer.global_rank}.txt"), "a") as f:
                f.writelines(example.cpu().numpy().tobytes().hex() + "\n" for example in batch[0])
