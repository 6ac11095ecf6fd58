"""Plain nn.Modules for adversarial training; no Lightning here.

Every network takes inputs in the natural range ([0, 1] images), normalizes inside with a ``Normalize``
first layer, and exposes ``forward_features(x) -> (B, feature_dim)`` (the penultimate representation) and
``head`` (the final linear layer), with ``forward(x) == head(forward_features(x))``.

Every network, and every wrapper (``Tensorized``, ``Binarized``, ``FeatureSqueezing``), also exposes its latent
layer (``advtrain.networks.latent``): ``forward_with_latent(x) -> (z, logits)`` in one forward pass (through
``__call__``, so ``channels_last`` and ``torch.compile`` apply), z flattened to ``(B, latent_dim)`` at the
layer named by the ``latent_layer`` constructor option (ADR's choice by default: the flattened conv output of
the small CNNs, the pooled penultimate representation of the ResNets), ``to_latent(x)`` and
``logits_from_latent(z)`` (the rest of the network from z).
"""

from .binary import XNOR, Binarized, binarize, sign_surrogate, sign_with_surrogate
from .cnn import CNN4C3F, CarliniCNN, DigitsCNN
from .latent import LatentNetwork
from .madry_resnet import MadryResNet
from .normalize import Normalize
from .preact_resnet import PreActResNet18
from .randomness import declares_randomness, randomness_at, randomness_off
from .resnet import ResNet18
from .soundnet import SoundNet5
from .squeeze import FeatureSqueezing
from .tensorize import Tensorized, tensorize
from .torchvision_net import IMAGENET_MEAN, IMAGENET_STD, TorchvisionNet
from .tucker import TuckerConv, TuckerLinear, is_tensorized, keep_probability
from .wide_resnet import WideResNet

# Per-channel statistics of the training sets, in [0, 1] units.
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2471, 0.2435, 0.2616]  # true per-pixel std (not the often-copied 0.2023, 0.1994, 0.2010)
MNIST_MEAN = [0.1307]
MNIST_STD = [0.3081]

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CNN4C3F",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "Binarized",
    "CarliniCNN",
    "DigitsCNN",
    "FeatureSqueezing",
    "LatentNetwork",
    "MadryResNet",
    "Normalize",
    "PreActResNet18",
    "ResNet18",
    "SoundNet5",
    "Tensorized",
    "TorchvisionNet",
    "TuckerConv",
    "TuckerLinear",
    "WideResNet",
    "XNOR",
    "binarize",
    "is_tensorized",
    "keep_probability",
    "randomness_off",
    "randomness_at",
    "declares_randomness",
    "sign_surrogate",
    "sign_with_surrogate",
    "tensorize",
]
