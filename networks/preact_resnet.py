"""Pre-activation ResNet-18 (He et al. 2016, "Identity Mappings in Deep Residual Networks").

CIFAR variant as in Wong et al. 2020 ("Fast is better than free", locuslab/fast_adversarial) and Rice et al.
2020: 3x3 stride-1 stem, no max-pool, and a final BN + ReLU before pooling. Without that final BN the last
block's output would reach the classifier un-normalized and un-activated, since pre-activation blocks put
BN/ReLU at their input. Parameters: kuangliu's PreActResNet18 (11,171,146) + 1,024 for the final BN.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from .latent import LatentNetwork
from .normalize import Normalize, check_channels


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; a 1x1 conv shortcut (no BN) taken from the pre-activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the activated input (He et al. 2016, Fig. 4e / kuangliu); identity sees raw x.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(LatentNetwork):
    """CIFAR PreActResNet-18: blocks [2, 2, 2, 2], widths 64-128-256-512, final BN-ReLU, global avg pool.

    Latent z (``latent_layer="penultimate"``, the only choice): the pooled 512-d representation after the final
    BN-ReLU, where ADR takes z in a ResNet.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        latent_layer: str = "penultimate",
    ):
        super().__init__()
        self.normalize = Normalize(mean, std)
        check_channels(self.normalize, in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.in_planes = 64
        self.layer1 = self._make_layer(64, 2, stride=1)
        self.layer2 = self._make_layer(128, 2, stride=2)
        self.layer3 = self._make_layer(256, 2, stride=2)
        self.layer4 = self._make_layer(512, 2, stride=2)
        self.bn = nn.BatchNorm2d(512)
        self.feature_dim = 512
        self.head = nn.Linear(self.feature_dim, num_classes)
        self._set_latent_layer(latent_layer, {"penultimate": self.feature_dim})

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def to_latent(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def logits_from_latent(self, z: Tensor) -> Tensor:
        return self.head(z)
