"""Small CNNs: CNN-4C3F (ADR), the Carlini & Wagner 2017 CNN (SGR), and a tiny CNN for 8x8 digits.

CNN-4C3F and the C&W CNN are the same family: four 3x3 convs with ReLU and two 2x2 max-pools, then two hidden
fully connected layers with dropout 0.5 between them (Carlini & Wagner 2017, "Towards Evaluating the Robustness
of Neural Networks", setup_mnist.py / setup_cifar.py; ADR supplementary section 2). The convolutions are
unpadded ("valid", the Keras default in C&W's code and ``nn.Conv2d(c, w, 3)`` in ADR's official PyTorch code);
``padding`` makes that a choice.
"""

from torch import Tensor, nn

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


class _FourConvThreeFC(nn.Module):
    """conv(a)-conv(a)-pool-conv(b)-conv(b)-pool-flatten | fc(h)-ReLU-dropout-fc(h)-ReLU | head."""

    def __init__(self, widths: tuple[int, int], hidden: int, num_classes: int, in_channels: int,
                 input_size: int, dropout: float, padding: int,
                 mean: list[float] | None, std: list[float] | None):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        a, b = widths
        self.normalize = Normalize(mean, std)
        check_channels(self.normalize, in_channels)
        # "Generator" in ADR's terms: the conv stack up to the flattened map.
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
        self.generator_dim = b * s * s
        self.classifier = nn.Sequential(
            nn.Linear(self.generator_dim, hidden), nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )
        self.feature_dim = hidden
        self.head = nn.Linear(hidden, num_classes)

    def generator(self, x: Tensor) -> Tensor:
        """Flattened conv output (B, generator_dim): where the ADR supplementary places z for this CNN."""
        return self.features(self.normalize(x))

    def forward_features(self, x: Tensor) -> Tensor:
        """Penultimate representation (B, hidden): the second hidden FC after its ReLU."""
        return self.classifier(self.generator(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class CNN4C3F(_FourConvThreeFC):
    """CNN-4C3F(width) of the ADR supplementary (Bui et al. 2020): 4 convs of ``width``, FC 200 (w=32) or 256.

    CNN-4C3F(32) is the MNIST net, CNN-4C3F(64) the CIFAR-10 net; ``hidden`` overrides the FC width.
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
    ):
        if width < 1:
            raise ValueError(f"CNN4C3F width must be positive, got {width}")
        if hidden is None:
            hidden = 200 if width == 32 else 256
        super().__init__((width, width), hidden, num_classes, in_channels, input_size, dropout, padding,
                         mean, std)


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
    ):
        if variant not in _CARLINI_VARIANTS:
            raise ValueError(f"CarliniCNN variant must be one of {sorted(_CARLINI_VARIANTS)}, got {variant!r}")
        widths, hidden, default_channels, default_size = _CARLINI_VARIANTS[variant]
        super().__init__(widths, hidden, num_classes,
                         default_channels if in_channels is None else in_channels,
                         default_size if input_size is None else input_size, dropout, padding, mean, std)
        self.variant = variant


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits (the embedded demo dataset): about 53k parameters at width 32.

    conv(w)-ReLU-pool -> conv(2w)-ReLU-pool -> flatten (2w x 2 x 2) -> FC(hidden)-ReLU -> head. Pooling twice
    keeps the FC layer small; an 8x8 digit loses little at 2x2 x 2w channels.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 32,
        hidden: int = 128,
        input_size: int = 8,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ):
        super().__init__()
        if width < 1 or hidden < 1:
            raise ValueError(f"DigitsCNN width and hidden must be positive, got {width}, {hidden}")
        s = input_size // 4
        if s < 1:
            raise ValueError(f"DigitsCNN input_size must be at least 4, got {input_size}")
        self.normalize = Normalize(mean, std)
        check_channels(self.normalize, in_channels)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * s * s, hidden), nn.ReLU(),
        )
        self.feature_dim = hidden
        self.head = nn.Linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))
