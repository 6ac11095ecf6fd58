"""One LightningModule per defense family; training_step makes adversarial examples on the device."""

from .base import AdversarialDefense, DefenseOutput
from .nuat import LinearRamp, NuAT
from .pgd_at import PGDAT
from .schedules import CyclicLRInEpochs, PiecewiseLinearLR
from .standard import Standard
from .trades import TRADES

__all__ = ["AdversarialDefense", "CyclicLRInEpochs", "DefenseOutput", "LinearRamp", "NuAT", "PGDAT",
           "PiecewiseLinearLR", "Standard", "TRADES"]
