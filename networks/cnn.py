"""Small CNNs: CNN-4C3F (ADR), the Carlini & Wagner 2017 CNN (SGR), and a tiny CNN for 8x8 digits.

CNN-4C3F and the C&W CNN are the same family: four 3x3 convs with ReLU and two 2x2 max-pools, then two hidden
fully connected layers with dropout 0.5 between them (Carlini & Wagner 2017, "Towards Evaluating the Robustness
of Neural Networks", setup_mnist.py / setup_cifar.py; ADR supplementary section 2). The convolutions are
unpadded ("valid", the Keras default in C&W's code and ``nn.Conv2d(c, w, 3)`` in ADR's official PyTorch code);
``padding`` makes that a choice.

Latent layer (``advtrain.networks.latent``): ``"conv"`` (default: the flattened conv output before the FC layers, where
the ADR supplementary, sections 2-3, puts z), ``"fc1"`` (first hidden FC after its ReLU, before dropout) or
``"penultimate"`` (second hidden FC after its ReLU, what ``head`` reads).
"""

from torch import Tensor, nn

from .latent import LatentNetwork
from .normalize import Normalize, check_channels


def _conv_output_size(input_size: int, padding: int) -> int:
    """Spatial size after (conv3x3, conv3x3, maxpool2) twice."""
    s = input_size
    for _ in range(2):
        s = (s + 2 * padding - 2 + 2 * padding - 2) // 2
    if s < 1:
        raise ValueError(f"input_size={input_size} is too small for four 3x3 convs (padding={padding}) "
                         "and two 2x2 max-pools")
    return s


# latent layer -> how many modules of `classifier` (Linear, ReLU, Dropout, Linear, ReLU) run before z.
_CNN_SPLITS = {"conv": 0, "fc1": 2, "penultimate": 5}


class _FourConvThreeFC(LatentNetwork):
    """conv(a)-conv(a)-pool-conv(b)-conv(b)-pool-flatten | fc(h)-ReLU-dropout-fc(h)-ReLU | head."""

    LATENT_LAYERS = tuple(_CNN_SPLITS)

    def __init__(self, widths: tuple[int, int], hidden: int, num_classes: int, in_channels: int,
                 input_size: int, dropout: float, padding: int,
                 mean: list[float] | None, std: list[float] | None, latent_layer: str):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        a, b = widths
        self.normalize = Normalize(mean, std)
        check_channels(self.normalize, in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, a, 3, padding=padding), nn.ReLU(),
            nn.Conv2d(a, a, 3, padding=padding), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(a, b, 3, padding=padding), nn.ReLU(),
            nn.Conv2d(b, b, 3, padding=padding), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        s = _conv_output_size(input_size, padding)
        self.conv_dim = b * s * s  # size of the flattened conv output
        self.classifier = nn.Sequential(
            nn.Linear(self.conv_dim, hidden), nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )
        self.feature_dim = hidden
        self.head = nn.Linear(hidden, num_classes)
        self._set_latent_layer(latent_layer, {"conv": self.conv_dim, "fc1": hidden, "penultimate": hidden})
        self._split = _CNN_SPLITS[latent_layer]

    def to_latent(self, x: Tensor) -> Tensor:
        z = self.features(self.normalize(x))
        for i in range(self._split):
            z = self.classifier[i](z)
        return z

    def logits_from_latent(self, z: Tensor) -> Tensor:
        for i in range(self._split, len(self.classifier)):
            z = self.classifier[i](z)
        return self.head(z)

    def forward_features(self, x: Tensor) -> Tensor:
        """Penultimate representation (B, hidden): the second hidden FC after its ReLU."""
        return self.classifier(self.features(self.normalize(x)))


class CNN4C3F(_FourConvThreeFC):
    """CNN-4C3F(width) of the ADR supplementary (Bui et al. 2020): convs width-width-pool-2w-2w-pool, FC 200 (w=32)
    or 256 (otherwise), i.e. the Carlini & Wagner networks the supplementary cites.

    CNN-4C3F(32) is the MNIST net (= ``CarliniCNN("mnist")``), CNN-4C3F(64) the CIFAR-10 net
    (= ``CarliniCNN("cifar")`` on 3 x 32 x 32). The supplementary's table literally writes four convs of
    ``width``, which contradicts its own reference (docs/methods.md, ADR): we follow C&W; ``second_width=width`` gives
    the literal reading. ``hidden`` overrides the FC width.
    """

    def __init__(
        self,
        width: int = 32,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        dropout: float = 0.5,
        hidden: int | None = None,
        padding: int = 0,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        latent_layer: str = "conv",
        second_width: int | None = None,
    ):
        second_width = 2 * width if second_width is None else second_width
        if width < 1 or second_width < 1:
            raise ValueError(f"CNN4C3F width and second_width must be positive, got {width}, {second_width}")
        if hidden is None:
            hidden = 200 if width == 32 else 256
        super().__init__((width, second_width), hidden, num_classes, in_channels, input_size, dropout, padding,
                         mean, std, latent_layer)


# variant -> (conv widths, FC width, default in_channels, default input_size), from C&W's setup_*.py.
_CARLINI_VARIANTS = {"mnist": ((32, 64), 200, 1, 28), "cifar": ((64, 128), 256, 3, 32)}


class CarliniCNN(_FourConvThreeFC):
    """Carlini & Wagner 2017 CNN, the SGR architecture (Roth et al. 2018).

    variant "mnist": conv32-conv32-pool-conv64-conv64-pool-fc200-fc200 (1 x 28 x 28 inputs);
    variant "cifar": conv64-conv64-pool-conv128-conv128-pool-fc256-fc256 (3 x 32 x 32 inputs).
    in_channels and input_size default to the variant's dataset.
    """

    def __init__(
        self,
        variant: str = "mnist",
        num_classes: int = 10,
        in_channels: int | None = None,
        input_size: int | None = None,
        dropout: float = 0.5,
        padding: int = 0,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        latent_layer: str = "conv",
    ):
        if variant not in _CARLINI_VARIANTS:
            raise ValueError(f"CarliniCNN variant must be one of {sorted(_CARLINI_VARIANTS)}, got {variant!r}")
        widths, hidden, default_channels, default_size = _CARLINI_VARIANTS[variant]
        super().__init__(widths, hidden, num_classes,
                         default_channels if in_channels is None else in_channels,
                         default_size if input_size is None else input_size, dropout, padding, mean, std,
                         latent_layer)
        self.variant = variant


class DigitsCNN(LatentNetwork):
    """A small CNN for scikit-learn's 8x8 digits (the embedded demo dataset): about 53k parameters at width 32.

    conv(w)-ReLU-pool -> conv(2w)-ReLU-pool -> flatten (2w x 2 x 2) -> FC(hidden)-ReLU -> head. Pooling twice
    keeps the FC layer small; an 8x8 digit loses little at 2x2 x 2w channels. ``latent_layer``: ``"conv"``
    (default, the flattened conv output, as for CNN-4C3F) or ``"penultimate"`` (the hidden FC after its ReLU).
    """

    LATENT_LAYERS = ("conv", "penultimate")

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        hidden: int = 128,
        input_size: int = 8,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        latent_layer: str = "conv",
    ):
        super().__init__()
        if width < 1 or hidden < 1:
            raise ValueError(f"DigitsCNN width and hidden must be positive, got {width}, {hidden}")
        s = input_size // 4
        if s < 1:
            raise ValueError(f"DigitsCNN input_size must be at least 4, got {input_size}")
        self.normalize = Normalize(mean, std)
        check_channels(self.normalize, in_channels)
        # One Sequential (its state_dict keys predate the latent split); modules [0, 7) are the conv part.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * s * s, hidden), nn.ReLU(),
        )
        self.conv_dim = 2 * width * s * s
        self.feature_dim = hidden
        self.head = nn.Linear(hidden, num_classes)
        self._set_latent_layer(latent_layer, {"conv": self.conv_dim, "penultimate": hidden})
        self._split = {"conv": 7, "penultimate": len(self.features)}[latent_layer]

    def to_latent(self, x: Tensor) -> Tensor:
        z = self.normalize(x)
        for i in range(self._split):
            z = self.features[i](z)
        return z

    def logits_from_latent(self, z: Tensor) -> Tensor:
        for i in range(self._split, len(self.features)):
            z = self.features[i](z)
        return self.head(z)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(self.normalize(x))
