"""One LightningModule per defense family; training_step makes adversarial examples on the device."""

from .adr import ADR
from .base import AdversarialDefense
from .mixture import MixtureAT
from .nuat import LinearRamp, NuAT
from .outputs import DefenseOutput, StepOutput, step_output
from .pgd_at import PGDAT
from .schedules import CyclicLRInEpochs, PiecewiseLinearLR
from .sgr import GN, SGR
from .standard import Standard
from .trades import TRADES

__all__ = ["ADR", "GN", "PGDAT", "SGR", "TRADES", "AdversarialDefense", "CyclicLRInEpochs", "DefenseOutput",
           "LinearRamp", "MixtureAT", "NuAT", "PiecewiseLinearLR", "Standard", "StepOutput", "step_output"]
