"""Binary networks: XNOR-Net (Rastegari, Ordonez, Redmon, Farhadi 2016, "XNOR-Net: ImageNet Classification
Using Binary Convolutional Neural Networks"), as used by defensive tensorization (Bulat et al. 2021, section 6.1).

An XNOR layer approximates a convolution (or linear layer) of real input I and weight W by one of signs,
rescaled by two real factors (XNOR-Net eqs. 2-11, defensive tensorization eq. 5):

    I * W  ~=  (sign(I) (*) sign(W)) . K . alpha

* alpha (per output channel) = mean |W| over that channel's weights: the optimal scale of sign(W).
* K (per output position) = the mean over input channels of |I|, A = mean_c |I_c|, averaged over each
  receptive field: K = A * k, k a k_h x k_w box filter of 1 / (k_h k_w) applied with the conv's stride, padding
  and dilation. For a linear layer K = mean |I| over the features, one value per example.

Following XNOR-Net's binary block (BatchNorm -> BinActiv -> BinConv -> [ReLU, pooling after it as in the real
network]), each XNOR layer first batch-normalizes its input: the input of most layers comes out of a ReLU,
whose sign would be +1 everywhere; the BatchNorm re-centres it so that sign(I) carries information, and the
learned affine sets where the threshold falls.

sign has zero derivative almost everywhere, so its backward is a surrogate. Training (and the default attack)
uses the straight-through estimator clipped to [-1, 1] (grad * 1{|x| <= 1}); for the weights it is always
this one. For the activations the backward can be switched, as the attacks of Table 4 do, to the derivative
of tanh(x) or tanh(0.75 x) (``sign_surrogate``).

``binarize`` keeps the first conv and the last linear layer real-valued (usual XNOR-Net practice: binarizing
the input layer destroys too much of the signal, and the classifier's logits need real weights). The XNOR layer
reads its inner layer's ``weight`` exactly once per forward, so the inner layer can be a randomized Tucker
layer (``advtrain.networks.tucker``): ``tensorize`` works before or after ``binarize``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.attacks.surrogates import register_surrogates

from .tucker import TuckerConv, TuckerLayer, TuckerLinear
from .wrapper import TransformedNetwork, temporarily_set

SURROGATES = ("ste", "tanh", "tanh0.75")  # the first is training's; XNOR declares these (advtrain.attacks.surrogates)

_FORWARDED = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding",
              "dilation", "groups")


def check_surrogate(name: str) -> str:
    if name not in SURROGATES:
        raise ValueError(f"unknown sign surrogate {name!r}; choose one of: {', '.join(SURROGATES)}")
    return name


def _surrogate_derivative(x: Tensor, surrogate: str) -> Tensor:
    """d/dx of the function whose derivative stands in for sign's: clipped identity, tanh(x) or tanh(0.75x)."""
    if surrogate == "ste":
        return (x.abs() <= 1).to(x.dtype)
    if surrogate == "tanh":
        return 1 - torch.tanh(x).square()
    if surrogate == "tanh0.75":
        return 0.75 * (1 - torch.tanh(0.75 * x).square())
    raise ValueError(f"unknown sign surrogate {surrogate!r}; choose one of: {', '.join(SURROGATES)}")


class _SignWithSurrogate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, surrogate: str) -> Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        # sign(0) = +1, so the output is exactly +-1 (torch.sign(0) = 0 would drop the entry).
        return torch.where(x < 0, -torch.ones_like(x), torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * _surrogate_derivative(x, ctx.surrogate).to(grad.dtype), None


def sign_with_surrogate(x: Tensor, surrogate: str = "ste") -> Tensor:
    """sign(x) in {-1, +1} (sign(0) = +1) whose backward is the derivative of the surrogate:

    ``ste``: grad * 1{|x| <= 1} (straight-through, clipped to [-1, 1]); ``tanh``: grad * (1 - tanh(x)^2);
    ``tanh0.75``: grad * 0.75 (1 - tanh(0.75 x)^2).
    """
    return _SignWithSurrogate.apply(x, check_surrogate(surrogate))


def _weight_ndim(layer: nn.Module) -> int:
    if isinstance(layer, TuckerLayer):
        return len(layer.weight_shape)
    return layer.weight.dim()


def _is_binarizable(module: nn.Module) -> bool:
    # type(...) is nn.Linear as in tensorize: leaves subclasses such as MultiheadAttention's out_proj alone.
    return isinstance(module, (nn.Conv1d, nn.Conv2d, TuckerConv, TuckerLinear)) or type(module) is nn.Linear


@register_surrogates
class XNOR(nn.Module):
    """XNOR-Net binary version of one Conv1d / Conv2d / Linear (or Tucker) layer, kept as ``self.layer``.

    forward(x) = BN(x) -> s = sign(BN(x)) with the ``surrogate`` backward -> conv(s, sign(W)) * alpha * K + bias,
    with alpha = mean |W| per output channel, sign(W) by the clipped straight-through estimator, and K the
    mean |BN(x)| over channels averaged over each receptive field (over the features for a linear layer).
    See the module docstring. ``self.bn`` normalizes the input channels (BatchNorm1d for Conv1d and Linear,
    BatchNorm2d for Conv2d). Conv attributes (in_channels, stride, ...) and in/out_features are forwarded to
    the inner layer, so code that reads ``head.out_features`` keeps working.

    Declares its sign backwards as attack surrogates (``advtrain.attacks.surrogates``): ``bpda: true`` picks the
    straight-through estimator, and a setting that chooses one is labelled ``sign'=<name>``.
    """

    SURROGATES = SURROGATES
    BPDA = "ste"
    SURROGATE_LABEL = "sign'={}"  # evaluation result names ("fgsm sign'=tanh eps=...") depend on it

    def __init__(self, layer: nn.Module, surrogate: str = "ste"):
        super().__init__()
        if not _is_binarizable(layer):
            raise TypeError(f"XNOR wraps an nn.Conv1d, nn.Conv2d, nn.Linear, TuckerConv or TuckerLinear, got "
                            f"{type(layer).__name__}")
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"XNOR supports padding_mode='zeros' only, got {layer.padding_mode!r}")
        self.surrogate = check_surrogate(surrogate)
        ndim = _weight_ndim(layer)
        channels = layer.in_features if ndim == 2 else layer.in_channels
        reference = next(layer.parameters())
        bn = nn.BatchNorm2d(channels) if ndim == 4 else nn.BatchNorm1d(channels)
        self.bn = bn.to(device=reference.device, dtype=reference.dtype)
        self.layer = layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _FORWARDED:
                return getattr(self._modules["layer"], name)
            raise

    def _normalize(self, x: Tensor, linear: bool) -> Tensor:
        if linear and x.dim() != 2:  # (B, ..., F): BatchNorm1d over the features of every leading position
            return self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        return self.bn(x)

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        w = layer.weight  # read once: a Tucker layer draws a new random weight on every access
        ndim = w.dim()
        if ndim not in (2, 3, 4):
            raise ValueError(f"XNOR: inner weight must be 2-D (linear), 3-D (conv1d) or 4-D (conv2d), got "
                             f"shape {list(w.shape)}")
        x = self._normalize(x, linear=ndim == 2)
        s = sign_with_surrogate(x, self.surrogate)
        # alpha: mean |W| per output channel; sign(W) always with the clipped STE (as in XNOR-Net training).
        alpha = w.abs().flatten(1).mean(1)
        wb = sign_with_surrogate(w, "ste")
        if ndim == 2:
            k = x.abs().mean(-1, keepdim=True)
            out = F.linear(s, wb) * alpha * k
        else:
            conv = F.conv1d if ndim == 3 else F.conv2d
            args = (layer.stride, layer.padding, layer.dilation)
            a = x.abs().mean(1, keepdim=True)
            kernel = w.shape[2:]
            box = torch.full((1, 1, *kernel), 1.0 / kernel.numel(), dtype=a.dtype, device=a.device)
            k = conv(a, box, None, *args)
            out = conv(s, wb, None, *args, layer.groups) * alpha.view(-1, *[1] * (ndim - 2)) * k
        if layer.bias is not None:
            out = out + (layer.bias if ndim == 2 else layer.bias.view(-1, *[1] * (ndim - 2)))
        return out

    def extra_repr(self) -> str:
        return f"surrogate={self.surrogate!r}"


def xnor_layers(module: nn.Module) -> Iterator[XNOR]:
    return (m for m in module.modules() if isinstance(m, XNOR))


def is_binarized(module: nn.Module) -> bool:
    return any(True for _ in xnor_layers(module))


def binarizable_layers(network: nn.Module) -> list[str]:
    """Qualified names (``named_modules`` order) of the layers ``binarize`` may wrap."""
    return [name for name, m in network.named_modules() if name and _is_binarizable(m)]


def binarize(network: nn.Module, surrogate: str = "ste", keep_real: list[str] | None = None) -> nn.Module:
    """Wrap, in place, every Conv1d / Conv2d / Linear (or Tucker) layer of ``network`` in an ``XNOR`` layer.

    ``keep_real`` lists the qualified module names (as in ``named_modules``) that stay real-valued; by default
    the first and the last such layer in ``named_modules`` order, i.e. the first conv and the classifier head
    in the networks of this package (XNOR-Net practice). ``[]`` binarizes every layer. Returns the network.
    """
    check_surrogate(surrogate)
    if is_binarized(network):
        raise ValueError(f"{type(network).__name__} already has XNOR layers; binarize it once")
    names = binarizable_layers(network)
    if not names:
        raise ValueError(f"binarize found no Conv1d, Conv2d or Linear layer in {type(network).__name__}")
    if keep_real is None:
        keep = {names[0], names[-1]}
    else:
        keep = set(keep_real)
        unknown = sorted(keep - set(names))
        if unknown:
            raise ValueError(f"keep_real names {unknown} are not Conv1d/Conv2d/Linear layers of "
                             f"{type(network).__name__}; choose among {names}")
    for name in names:
        if name in keep:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = network.get_submodule(parent_name)
        setattr(parent, child_name, XNOR(getattr(parent, child_name), surrogate=surrogate))
    return network


@contextmanager
def sign_surrogate(module: nn.Module, name: str) -> Iterator[nn.Module]:
    """Temporarily set the activation-sign backward of every XNOR layer of ``module`` (restored on exit).

    ``ste`` (clipped identity, as in training), ``tanh`` or ``tanh0.75``: the attacks of Table 4. A module
    without XNOR layers is left as is.
    """
    with temporarily_set(xnor_layers(module), "surrogate", check_surrogate(name)):
        yield module


class Binarized(TransformedNetwork):
    """Config-friendly wrapper: ``advtrain.networks.Binarized(network=..., surrogate="ste", keep_real=None)``.

    Binarizes ``network`` (``binarize``: every conv/linear layer but the first and the last becomes XNOR) and
    keeps its ``forward_features`` / ``head`` / ``feature_dim`` and latent interface. ``keep_real`` names are
    relative to ``network``. Wrap the result in ``Tensorized`` for a binary tensorized network.
    """

    def __init__(self, network: nn.Module, surrogate: str = "ste", keep_real: list[str] | None = None):
        super().__init__()
        self.network = binarize(network, surrogate=surrogate, keep_real=keep_real)
