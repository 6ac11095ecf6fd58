"""SoundNet5 for Speech Commands: an end-to-end 1-D CNN on the raw 16 kHz waveform (Aytar, Vondrick, Torralba
2016, "SoundNet"), in the configuration of defensive tensorization (Bulat et al. 2021, section 5 / 6.2).

Five conv layers [in, out, kernel, stride, padding] = [1, 16, 64, 2, 32], [16, 32, 32, 2, 16],
[32, 64, 16, 2, 8], [64, 128, 8, 2, 4], [128, 256, 4, 2, 2] (the paper writes the kernels as 2-D 1 x k; a Conv1d
is the same operation), each followed by BatchNorm, ReLU and max pooling, then Linear 512 -> 256 (ReLU) and the
head Linear 256 -> 12.

Pool sizes. The paper only says that each conv is followed by max pooling, and its 512-d flatten fixes the
product of the pools. Each conv maps a length L to floor(L / 2) + 1, and a pool of size p (stride p) to
floor(L / p). Pools (4, 4, 4, 2, 2) give, for 16000 samples,
16000 -> conv 8001 -> pool 2000 -> conv 1001 -> pool 250 -> conv 126 -> pool 31 -> conv 16 -> pool 8
-> conv 5 -> pool 2, i.e. 256 channels x 2 = 512, with a real pooling after every conv. Original SoundNet's
pool of 8 after conv1 and conv2 cannot reach 512 here without a pool of size 1 (no pooling) after a later conv
((8, 8, 2, 1, 2)), so it is not the default; ``pool_sizes`` can choose it.

BatchNorm follows every conv as in SoundNet (the convs then have no bias, which the BatchNorm would cancel).
Waveforms are already centred in [-1, 1]: the ``Normalize`` first layer is the identity.
"""

from torch import Tensor, nn

from .latent import LatentNetwork
from .normalize import Normalize

# [in_channels, out_channels, kernel, stride, padding] of the five convs (defensive tensorization, section 5).
SOUNDNET5_CONVS = ((1, 16, 64, 2, 32), (16, 32, 32, 2, 16), (32, 64, 16, 2, 8), (64, 128, 8, 2, 4),
                   (128, 256, 4, 2, 2))
SOUNDNET5_POOLS = (4, 4, 4, 2, 2)


def soundnet5_lengths(input_length: int, pool_sizes=SOUNDNET5_POOLS) -> list[int]:
    """Sequence length after each (conv, pool) stage for an input of ``input_length`` samples."""
    lengths, n = [], input_length
    for (_, _, kernel, stride, padding), pool in zip(SOUNDNET5_CONVS, pool_sizes, strict=True):
        n = (n + 2 * padding - kernel) // stride + 1
        n //= pool
        lengths.append(n)
    return lengths


class SoundNet5(LatentNetwork):
    """SoundNet5 on (B, 1, input_length) waveforms in [-1, 1]; 16000 samples (1 s at 16 kHz) by default.

    ``forward_features`` returns the 256-d hidden layer after its ReLU; ``head`` is the Linear 256 ->
    num_classes. ``flatten_dim`` (512 by default) is the size of the flattened conv output. ``latent_layer``:
    ``"penultimate"`` (default, the 256-d hidden layer, as ADR places z after a network's last hidden
    representation) or ``"conv"`` (the flattened conv output, as for the CNN-4C3F networks).
    """

    LATENT_LAYERS = ("conv", "penultimate")

    def __init__(self, num_classes: int = 12, input_length: int = 16000, hidden: int = 256,
                 pool_sizes: tuple[int, ...] | list[int] = SOUNDNET5_POOLS, latent_layer: str = "penultimate"):
        super().__init__()
        pool_sizes = tuple(int(p) for p in pool_sizes)
        if len(pool_sizes) != len(SOUNDNET5_CONVS) or any(p < 1 for p in pool_sizes):
            raise ValueError(f"SoundNet5 needs {len(SOUNDNET5_CONVS)} positive pool sizes, got {list(pool_sizes)}")
        lengths = soundnet5_lengths(input_length, pool_sizes)
        if min(lengths) < 1:
            raise ValueError(f"SoundNet5: input_length={input_length} is too short for pool sizes {list(pool_sizes)} "
                             f"(lengths after each stage: {lengths})")
        self.input_length = int(input_length)
        self.pool_sizes = pool_sizes
        self.normalize = Normalize()  # raw waveforms in [-1, 1] need no normalization
        layers: list[nn.Module] = []
        for (c_in, c_out, kernel, stride, padding), pool in zip(SOUNDNET5_CONVS, pool_sizes, strict=True):
            layers += [nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
                       nn.BatchNorm1d(c_out), nn.ReLU(), nn.MaxPool1d(pool)]
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.flatten_dim = SOUNDNET5_CONVS[-1][1] * lengths[-1]
        self.classifier = nn.Sequential(nn.Linear(self.flatten_dim, hidden), nn.ReLU())
        self.feature_dim = hidden
        self.head = nn.Linear(hidden, num_classes)
        self._set_latent_layer(latent_layer, {"conv": self.flatten_dim, "penultimate": hidden})

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[2] != self.input_length:
            raise ValueError(f"SoundNet5 expects mono waveforms of shape (B, 1, {self.input_length}), got "
                             f"{tuple(x.shape)}")

    def forward_features(self, x: Tensor) -> Tensor:
        """The 256-d hidden representation (after its ReLU)."""
        self._check_input(x)
        return self.classifier(self.features(self.normalize(x)))

    def to_latent(self, x: Tensor) -> Tensor:
        if self.latent_layer == "conv":
            self._check_input(x)
            return self.features(self.normalize(x))
        return self.forward_features(x)

    def logits_from_latent(self, z: Tensor) -> Tensor:
        if self.latent_layer == "conv":
            z = self.classifier(z)
        return self.head(z)
