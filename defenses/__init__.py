"""One LightningModule per defense family; training_step makes adversarial examples on the device."""

from .adr import ADR
from .base import AdversarialDefense, DefenseOutput
from .mixture import MixtureAT
from .nuat import LinearRamp, NuAT
from .pgd_at import PGDAT
from .schedules import CyclicLRInEpochs, PiecewiseLinearLR
from .sgr import GN, SGR
from .standard import Standard
from .trades import TRADES

__all__ = ["ADR", "AdversarialDefense", "CyclicLRInEpochs", "DefenseOutput", "LinearRamp", "NuAT", "PGDAT",
           "PiecewiseLinearLR", "Standard", "TRADES"]
__all__ += ["GN", "MixtureAT", "SGR"]
