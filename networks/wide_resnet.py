"""Wide ResNet (Zagoruyko & Komodakis 2016, "Wide Residual Networks").

The version used by Madry et al. and TRADES (yaodongyu/TRADES models/wideresnet.py, from xternalz/WideResNet-
pytorch): pre-activation basic blocks, widths 16-16k-32k-64k, a final BN-ReLU and global average pooling.
TRADES' file also builds an unused ``sub_block1`` that only inflates the parameter count; it is left out here,
so WRN-34-10 has 46,160,474 parameters for 10 classes.
"""

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .latent import LatentNetwork
from .normalize import Normalize, check_channels


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3; a 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        # As in the reference code: a projection shortcut takes the pre-activated input, identity the raw x.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(LatentNetwork):
    """WRN-depth-widen_factor; default WRN-34-10 (TRADES, Madry et al., NuAT2).

    Latent z (``latent_layer="penultimate"``, the only choice): the pooled representation after the final BN-ReLU.
    ADR's CIFAR ResNet is Madry's non-wide ResNet, ``advtrain.networks.MadryResNet``.
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        latent_layer: str = "penultimate",
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1 (e.g. 16, 28, 34), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WideResNet dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = Normalize(mean, std)
        check_channels(self.normalize, in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._make_group(n, widths[0], widths[1], 1, dropout)
        self.block2 = self._make_group(n, widths[1], widths[2], 2, dropout)
        self.block3 = self._make_group(n, widths[2], widths[3], 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.feature_dim = widths[3]
        self.head = nn.Linear(self.feature_dim, num_classes)
        self._set_latent_layer(latent_layer, {"penultimate": self.feature_dim})
        self._init_weights()

    @staticmethod
    def _make_group(n: int, in_planes: int, out_planes: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout)
            for i in range(n)
        ])

    def _init_weights(self) -> None:
        # The reference code's He init (fan_out) and zero linear bias; training recipes were tuned with it.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def to_latent(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def logits_from_latent(self, z: Tensor) -> Tensor:
        return self.head(z)
