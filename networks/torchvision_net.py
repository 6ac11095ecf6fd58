"""Any torchvision classification model behind the networks contract (Normalize, forward_features, head).

Used for ImageNet-100 (NuAT trains a ResNet-18 there). The model comes from ``torchvision.models.get_model``;
its last linear layer becomes ``self.head`` and is replaced inside the model by an Identity, so the model's
own forward returns the penultimate features.
"""

import torchvision
from torch import Tensor, nn

from .latent import LatentNetwork
from .normalize import Normalize, check_channels

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Where the last linear layer lives, by family: resnet/resnext/wide_resnet/regnet/shufflenet/googlenet/
# inception use `fc`; densenet `classifier`; vgg/alexnet/mobilenet/efficientnet/convnext/mnasnet/maxvit
# `classifier[-1]`; swin `head`; vit `heads.head`.
_HEAD_PATHS = ("fc", "classifier", "classifier.-1", "head", "heads.head")


def _find_head(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    """(parent module, attribute name, the Linear) of the model's last linear layer, or None."""
    for path in _HEAD_PATHS:
        *parents, last = path.split(".")
        parent = model
        for name in parents:
            parent = getattr(parent, name, None)
        if last == "-1":
            if not isinstance(parent, nn.Sequential) or len(parent) == 0:
                continue
            last = str(len(parent) - 1)  # nn.Sequential names its children "0", "1", ...
        layer = getattr(parent, last, None)
        if isinstance(layer, nn.Linear):
            return parent, last, layer
    return None


class TorchvisionNet(LatentNetwork):
    """A torchvision model by name, e.g. ``TorchvisionNet("resnet18", num_classes=100)``.

    weights: None (random init, never downloads) or a torchvision weights name such as "IMAGENET1K_V1" or
    "DEFAULT". With weights and a class count different from theirs, the pretrained head is replaced by a
    fresh linear layer (fine-tuning). Families without a final ``nn.Linear`` at a known place (squeezenet,
    detection/segmentation models) raise ValueError. Latent z (``latent_layer="penultimate"``, the only choice,
    since the inside of a torchvision model differs by family): the input of the last linear layer.
    """

    def __init__(
        self,
        name: str = "resnet18",
        num_classes: int = 100,
        in_channels: int = 3,
        mean: list[float] | None = IMAGENET_MEAN,
        std: list[float] | None = IMAGENET_STD,
        weights: str | None = None,
        latent_layer: str = "penultimate",
    ):
        super().__init__()
        if in_channels != 3:
            raise ValueError(f"TorchvisionNet supports in_channels=3 only (torchvision stems), got {in_channels}")
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown torchvision classification model {name!r}; see "
                             "torchvision.models.list_models(module=torchvision.models)")
        self.normalize = Normalize(mean, std)
        check_channels(self.normalize, in_channels)
        kwargs = {}
        if name in ("googlenet", "inception_v3"):
            # Auxiliary heads would make forward return a namedtuple in training mode.
            kwargs["aux_logits"] = False
        if weights is None:
            # torchvision refuses a num_classes that differs from pretrained weights, so pass it only here.
            kwargs["num_classes"] = num_classes
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
        found = _find_head(model)
        if found is None:
            raise ValueError(f"TorchvisionNet: cannot find a final nn.Linear in torchvision model {name!r}; "
                             f"supported families keep it at one of {list(_HEAD_PATHS)}")
        parent, attr, head = found
        setattr(parent, attr, nn.Identity())
        if head.out_features != num_classes:
            head = nn.Linear(head.in_features, num_classes)
        self.model = model
        self.head = head
        self.feature_dim = head.in_features
        self._set_latent_layer(latent_layer, {"penultimate": self.feature_dim})
        self.name = name

    def forward_features(self, x: Tensor) -> Tensor:
        return self.model(self.normalize(x))

    def to_latent(self, x: Tensor) -> Tensor:
        return self.forward_features(x)

    def logits_from_latent(self, z: Tensor) -> Tensor:
        return self.head(z)
