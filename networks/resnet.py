"""ResNet-18, CIFAR variant (He et al. 2016, "Deep Residual Learning for Image Recognition").

The CIFAR variant used in adversarial training (Madry et al. 2018; Rice et al. 2020; NuAT) follows
kuangliu/pytorch-cifar: a 3x3 stride-1 stem and no max-pool, because 32x32 inputs cannot afford the
ImageNet stem's 4x downsampling. 11,173,962 parameters for 10 classes.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from .latent import LatentNetwork
from .normalize import Normalize, check_channels


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; a 1x1 conv + BN shortcut when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(LatentNetwork):
    """CIFAR ResNet-18: BasicBlocks [2, 2, 2, 2], widths 64-128-256-512, global average pooling.

    ``forward_features`` returns the pooled 512-d representation after the last ReLU; it is the latent z
    (``latent_layer="penultimate"``, the only choice: ADR takes z after the final activation and pooling).
    ``width`` (64) scales every stage (w, 2w, 4w, 8w); smaller widths are for quick tests.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        width: int = 64,
        latent_layer: str = "penultimate",
    ):
        super().__init__()
        if width < 1:
            raise ValueError(f"ResNet18 width must be positive, got {width}")
        self.normalize = Normalize(mean, std)
        check_channels(self.normalize, in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.in_planes = width
        self.layer1 = self._make_layer(width, 2, stride=1)
        self.layer2 = self._make_layer(2 * width, 2, stride=2)
        self.layer3 = self._make_layer(4 * width, 2, stride=2)
        self.layer4 = self._make_layer(8 * width, 2, stride=2)
        self.feature_dim = 8 * width
        self.head = nn.Linear(self.feature_dim, num_classes)
        self._set_latent_layer(latent_layer, {"penultimate": self.feature_dim})

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Adaptive pooling equals kuangliu's avg_pool2d(out, 4) at 32x32 and still works at other sizes.
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def to_latent(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def logits_from_latent(self, z: Tensor) -> Tensor:
        return self.head(z)
