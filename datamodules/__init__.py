"""One LightningDataModule per dataset; images stay uint8 in memory and are augmented on the device."""

from .base import ArrayDataModule, TensorPairDataset, collate_batch
from .cifar10 import CIFAR10
from .digits import Digits
from .errors import DatasetError, DatasetNotFoundError, DatasetValueError
from .imagenet100 import ImageNet100
from .mnist import MNIST
from .speech_commands import SpeechCommands

__all__ = [
    "CIFAR10",
    "MNIST",
    "ArrayDataModule",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetValueError",
    "Digits",
    "ImageNet100",
    "SpeechCommands",
    "TensorPairDataset",
    "collate_batch",
]
