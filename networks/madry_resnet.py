"""Madry et al.'s CIFAR-10 ResNet (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial
Attacks"; MadryLab/cifar10_challenge, model.py, itself from tensorflow/models' resnet), the ADR CIFAR ResNet.

That file builds the wide "w28-10" network (filters 16-160-320-640) and says to use filters 16-16-32-64 for a
non-wide version: ADR's ResNet is the non-wide one (docs/methods.md, ADR section), the default here. Its structure:

- a 3x3 stride-1 conv (no bias) from the input to filters[0];
- three stages of ``units`` residual units (5: the file's loop ``range(1, 5)`` after the first unit),
  strides 1, 2, 2, from filters[0] to filters[1], filters[2], filters[3];
- a unit is BN - leaky ReLU(0.1) - conv3x3(stride) - BN - leaky ReLU(0.1) - conv3x3, plus a shortcut. The
  very first unit of the network activates before the residual split (its shortcut takes the activated
  input); every other unit's shortcut takes the raw input. When the width changes, the shortcut has no
  parameters: average pooling with kernel = stride, then zero channels padded equally on both sides;
- a final BN - leaky ReLU(0.1) - global average pooling (the 64-d latent z of ADR) and a linear layer.

16-16-32-64 gives 464,154 parameters for 10 classes. Choices of ours, beside the reference:

- Input: the reference standardizes each image (``tf.image.per_image_standardization``). We use a
  ``Normalize`` first layer with the dataset's mean/std like every other network here;
  ``per_image_standardization=True`` gives the reference's behaviour instead.
- BatchNorm: ``tf.contrib.layers.batch_norm`` with decay 0.9 (PyTorch momentum 0.1) and its default epsilon
  1e-3, kept. Initialization as the reference: convs N(0, 2 / (9 out)), linear U(-sqrt(3 / in), sqrt(3 / in))
  (``uniform_unit_scaling``), zero bias.
- Stride-2 convs pad 1 on each side; TensorFlow's "SAME" pads 0 before and 1 after, a one-pixel shift of the
  sampling grid with the same output size and parameter count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .latent import LatentNetwork
from .normalize import Normalize, check_channels

_BN_EPS = 1e-3  # tf.contrib.layers.batch_norm default
_BN_MOMENTUM = 0.1  # = 1 - decay 0.9


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MadryUnit(nn.Module):
    """One residual unit of Madry's ResNet (see the module docstring)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, activate_before_residual: bool,
                 leak: float):
        super().__init__()
        self.bn1 = _bn(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.activate_before_residual = activate_before_residual
        self.stride, self.leak = stride, leak
        self.pad = (out_planes - in_planes) // 2

    def shortcut(self, x: Tensor) -> Tensor:
        # The reference pools and pads when the width changes, which in its networks is exactly when the stride
        # is 2; pooling on the stride alone also covers equal widths with stride 2 (where the reference fails).
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride)
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad, self.pad))  # zero channels before and after
        return x

    def forward(self, x: Tensor) -> Tensor:
        activated = F.leaky_relu(self.bn1(x), self.leak)
        residual = self.shortcut(activated if self.activate_before_residual else x)
        out = self.conv1(activated)
        out = self.conv2(F.leaky_relu(self.bn2(out), self.leak))
        return out + residual


def _per_image_standardization(x: Tensor) -> Tensor:
    """tf.image.per_image_standardization: (x - mean) / max(std, 1 / sqrt(N)) over each image's N values."""
    n = x[0].numel()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return (x - mean) / torch.clamp(std, min=1.0 / math.sqrt(n))


class MadryResNet(LatentNetwork):
    """Madry et al.'s CIFAR ResNet, non-wide by default: filters 16-16-32-64, 5 units per stage, leaky ReLU 0.1.

    ``forward_features`` (= the latent z, ``latent_layer="penultimate"``, the only choice) is the 64-d output of
    the final BN + leaky ReLU + global average pooling, where ADR takes z; ``head`` is the linear layer.
    ``filters=[16, 160, 320, 640]`` gives the reference's wide w28-10 network.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        filters: Sequence[int] = (16, 16, 32, 64),
        units: int = 5,
        leak: float = 0.1,
        per_image_standardization: bool = False,
        latent_layer: str = "penultimate",
    ):
        super().__init__()
        filters = [int(f) for f in filters]
        if len(filters) != 4 or any(f < 1 for f in filters):
            raise ValueError(f"MadryResNet filters must be 4 positive widths (stem, stage 1, 2, 3), got {filters}")
        if any(b < a or (b - a) % 2 for a, b in zip(filters, filters[1:])):
            raise ValueError(f"MadryResNet filters must not decrease and must grow by even steps (the shortcut pads "
                             f"the new channels equally on both sides), got {filters}")
        if units < 1:
            raise ValueError(f"MadryResNet units (residual units per stage) must be >= 1, got {units}")
        if per_image_standardization and mean is not None:
            raise ValueError("MadryResNet: give mean/std or per_image_standardization=True, not both")
        self.per_image_standardization = per_image_standardization
        self.normalize = Normalize(mean, std)
        check_channels(self.normalize, in_channels)
        self.conv1 = nn.Conv2d(in_channels, filters[0], 3, stride=1, padding=1, bias=False)
        stages = []
        for stage, stride in enumerate((1, 2, 2)):
            a, b = filters[stage], filters[stage + 1]
            stages.append(nn.Sequential(*[
                MadryUnit(a if i == 0 else b, b, stride if i == 0 else 1,
                          activate_before_residual=stage == 0 and i == 0, leak=leak)
                for i in range(units)
            ]))
        self.stage1, self.stage2, self.stage3 = stages
        self.bn = _bn(filters[3])
        self.leak = leak
        self.feature_dim = filters[3]
        self.head = nn.Linear(self.feature_dim, num_classes)
        self._set_latent_layer(latent_layer, {"penultimate": self.feature_dim})
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # N(0, 2 / (k * k * out)), the reference's _conv
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Linear):  # uniform_unit_scaling_initializer(factor=1.0), zero bias
                bound = math.sqrt(3.0 / m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = _per_image_standardization(x) if self.per_image_standardization else self.normalize(x)
        out = self.stage3(self.stage2(self.stage1(self.conv1(x))))
        out = F.leaky_relu(self.bn(out), self.leak)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def to_latent(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def logits_from_latent(self, z: Tensor) -> Tensor:
        return self.head(z)
