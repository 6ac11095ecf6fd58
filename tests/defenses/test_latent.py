"""networks: the latent interface (forward_with_latent, latent_layer, logits_from_latent) and MadryResNet.

Every check compares against a computation the network code does not share: z read by a forward hook on the
layer that produces it (plus the pooling written out here), logits from ``head(forward_features(x))`` and
``network(x)``, call counts of every submodule, and an independent functional forward of Madry's ResNet.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter

from advtrain.networks import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CNN4C3F,
    MNIST_MEAN,
    MNIST_STD,
    Binarized,
    CarliniCNN,
    DigitsCNN,
    FeatureSqueezing,
    MadryResNet,
    PreActResNet18,
    ResNet18,
    SoundNet5,
    Tensorized,
    TorchvisionNet,
    WideResNet,
    randomness_off,
)


def _flat(out):
    return out.flatten(1)


def _pooled(act):
    """Global average pooling after ``act``, written out (not the networks' adaptive_avg_pool2d)."""
    return lambda out: act(out).mean(dim=(2, 3))


# (id, constructor, input shape, latent_dim, name of the module whose output gives z, how z follows from it)
CASES = [
    ("cnn4c3f_mnist_conv", lambda: CNN4C3F(width=32, mean=MNIST_MEAN, std=MNIST_STD), (1, 28, 28), 64 * 4 * 4,
     "features", _flat),
    ("cnn4c3f_cifar_conv", lambda: CNN4C3F(width=64, in_channels=3, input_size=32), (3, 32, 32), 128 * 5 * 5,
     "features", _flat),
    ("carlini_mnist_fc1", lambda: CarliniCNN("mnist", latent_layer="fc1"), (1, 28, 28), 200, "classifier.1", _flat),
    ("carlini_cifar_penultimate", lambda: CarliniCNN("cifar", latent_layer="penultimate"), (3, 32, 32), 256,
     "classifier.4", _flat),
    ("carlini_cifar_conv", lambda: CarliniCNN("cifar", mean=CIFAR10_MEAN, std=CIFAR10_STD), (3, 32, 32),
     128 * 5 * 5, "features", _flat),
    ("digits_conv", lambda: DigitsCNN(), (1, 8, 8), 64 * 2 * 2, "features.6", _flat),
    ("digits_penultimate", lambda: DigitsCNN(latent_layer="penultimate"), (1, 8, 8), 128, "features.8", _flat),
    ("resnet18", lambda: ResNet18(width=8, mean=CIFAR10_MEAN, std=CIFAR10_STD), (3, 32, 32), 64, "layer4",
     _pooled(lambda t: t)),  # a BasicBlock ends with its ReLU
    ("preact_resnet18", lambda: PreActResNet18(), (3, 16, 16), 512, "bn", _pooled(F.relu)),
    ("wrn10_1", lambda: WideResNet(depth=10, widen_factor=1), (3, 16, 16), 64, "bn", _pooled(F.relu)),
    ("madry_resnet", lambda: MadryResNet(mean=CIFAR10_MEAN, std=CIFAR10_STD), (3, 32, 32), 64, "bn",
     _pooled(lambda t: F.leaky_relu(t, 0.1))),
    ("tv_resnet18", lambda: TorchvisionNet("resnet18", num_classes=7), (3, 32, 32), 512, "model.avgpool", _flat),
    ("soundnet_penultimate", lambda: SoundNet5(input_length=4000), (1, 4000), 256, "classifier", _flat),
    # 4000 samples: 2001 -> pool 500 -> 251 -> 62 -> 32 -> 8 -> 5 -> 2 -> 2 -> 1, i.e. 256 channels x 1.
    ("soundnet_conv", lambda: SoundNet5(input_length=4000, latent_layer="conv"), (1, 4000), 256 * 1,
     "features", _flat),
]
IDS = [c[0] for c in CASES]


@pytest.fixture
def fresh_dynamo():
    """Compiled code is cached per code object across tests (all networks share LatentNetwork.forward): start
    and leave clean, so no test inherits another's recompilations or dynamic-shape decisions."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def hooked_output(model: nn.Module, name: str) -> list:
    """Register a forward hook on ``model.<name>`` that stores its output; returns the list it fills."""
    seen = []
    model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    return seen


def call_counts(model: nn.Module, run) -> Counter:
    """How many times each submodule's forward runs during ``run()``."""
    counts: Counter = Counter()
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: counts.update([name]))
               for name, m in model.named_modules() if name]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return counts


def check_latent_contract(model: nn.Module, x: torch.Tensor, latent_dim: int, z_ref: torch.Tensor | None = None,
                          atol: float = 1e-5):
    """(z, logits) from one call equal the separate computations, and the call is one forward."""
    z, logits = model.forward_with_latent(x)
    assert z.shape == (x.shape[0], latent_dim) and model.latent_dim == latent_dim
    torch.testing.assert_close(logits, model(x), atol=atol, rtol=1e-5)
    torch.testing.assert_close(logits, model.head(model.forward_features(x)), atol=atol, rtol=1e-4)
    torch.testing.assert_close(model.logits_from_latent(z), logits, atol=atol, rtol=1e-5)
    torch.testing.assert_close(model.to_latent(x), z, atol=atol, rtol=1e-5)
    if z_ref is not None:
        torch.testing.assert_close(z, z_ref, atol=atol, rtol=1e-5)
    # One forward: every submodule runs exactly as often as in a plain forward (no second pass for z).
    plain = call_counts(model, lambda: model(x))
    assert call_counts(model, lambda: model.forward_with_latent(x)) == plain and sum(plain.values()) > 0
    return z, logits


@pytest.mark.parametrize("make, shape, dim, layer, to_z", [c[1:] for c in CASES], ids=IDS)
def test_forward_with_latent_equals_separate_computations(make, shape, dim, layer, to_z):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.rand(3, *shape) * (2 if len(shape) == 2 else 1) - (1 if len(shape) == 2 else 0)  # audio in [-1, 1]
    seen = hooked_output(model, layer)
    with torch.no_grad():
        z, _ = model.forward_with_latent(x)
    assert len(seen) == 1  # the hooked layer ran once
    check_latent_contract(model, x, dim, to_z(seen[0]))
    assert z.abs().sum() > 0


def test_default_latent_layers_are_the_papers():
    # ADR supplementary / docs/methods.md: the flattened conv output for the CNNs, the pooled penultimate for ResNets.
    assert CNN4C3F().latent_layer == "conv" and CarliniCNN("cifar").latent_layer == "conv"
    assert CarliniCNN("cifar").latent_dim == CarliniCNN("cifar").conv_dim == 128 * 5 * 5
    assert DigitsCNN().latent_layer == "conv"
    for net in (MadryResNet(), WideResNet(depth=10, widen_factor=1), SoundNet5()):
        assert net.latent_layer == "penultimate" and net.latent_dim == net.feature_dim
    assert not hasattr(CNN4C3F(), "generator")  # removed: it clashed with the attacks' generator= argument


@pytest.mark.parametrize("make, allowed", [
    (lambda bad: CNN4C3F(latent_layer=bad), "['conv', 'fc1', 'penultimate']"),
    (lambda bad: CarliniCNN("mnist", latent_layer=bad), "['conv', 'fc1', 'penultimate']"),
    (lambda bad: DigitsCNN(latent_layer=bad), "['conv', 'penultimate']"),
    (lambda bad: SoundNet5(latent_layer=bad), "['conv', 'penultimate']"),
    (lambda bad: ResNet18(width=2, latent_layer=bad), "['penultimate']"),
    (lambda bad: WideResNet(depth=10, widen_factor=1, latent_layer=bad), "['penultimate']"),
    (lambda bad: MadryResNet(latent_layer=bad), "['penultimate']"),
], ids=["cnn4c3f", "carlini", "digits", "soundnet", "resnet18", "wrn", "madry"])
def test_bad_latent_layer_lists_the_allowed_ones(make, allowed):
    with pytest.raises(ValueError, match=re.escape(f"latent_layer must be one of {allowed}, got 'fc9'")):
        make("fc9")


def _digits(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("latent_layer", ["conv", "penultimate"])
def test_tensorized_wrapper_keeps_the_latent(latent_layer):
    torch.manual_seed(0)
    plain = DigitsCNN(latent_layer=latent_layer).eval()
    wrapped = Tensorized(copy.deepcopy(plain), rank=1.0, theta=0.9).eval()
    x = _digits()
    assert wrapped.latent_layer == latent_layer and wrapped.latent_dim == plain.latent_dim
    with randomness_off(wrapped), torch.no_grad():
        # Full-rank Tucker decomposition of the trained weights: the same function, so the same z.
        z_plain = plain.to_latent(x)
        check_latent_contract(wrapped, x, plain.latent_dim, z_plain, atol=1e-4)
    # theta < 1: a random draw per forward, still one forward (the contract's call counts) and finite.
    z, logits = wrapped.forward_with_latent(x)
    assert torch.isfinite(z).all() and logits.shape == (4, 10)
    assert call_counts(wrapped, lambda: wrapped.forward_with_latent(x)) == call_counts(wrapped, lambda: wrapped(x))


def test_binarized_and_binary_tensorized_wrappers_keep_the_latent():
    torch.manual_seed(0)
    net = Binarized(DigitsCNN(hidden=32)).eval()
    x = _digits()
    seen = hooked_output(net, "network.features.6")  # names inside the wrapper are the network's
    with torch.no_grad():
        net.forward_with_latent(x)
        check_latent_contract(net, x, 64 * 2 * 2, seen[0])
    both = Tensorized(Binarized(DigitsCNN(latent_layer="penultimate")), theta=1.0).eval()
    with torch.no_grad():
        check_latent_contract(both, x, 128, both.forward_features(x), atol=1e-4)


def test_feature_squeezing_squeezes_before_the_latent():
    torch.manual_seed(0)
    inner = DigitsCNN()
    model = FeatureSqueezing(inner, bits=3, median_size=2).eval()
    x = _digits()
    with torch.no_grad():
        z_ref = inner.to_latent(model.squeeze(x))  # the squeezer acts on the input only
        z, logits = check_latent_contract(model, x, inner.latent_dim, z_ref)
        assert not torch.allclose(z, inner.to_latent(x))  # the squeezer really ran
        torch.testing.assert_close(model.logits_from_latent(z), inner.logits_from_latent(z))
    plain = FeatureSqueezing(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    assert plain(x).shape == (4, 10)  # any module may be wrapped as long as nobody asks for z
    with pytest.raises(TypeError, match="no latent layer"):
        plain.forward_with_latent(x)
    with pytest.raises(TypeError, match="no latent layer"):
        Tensorized(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))).forward_with_latent(x)


def test_latent_through_channels_last():
    torch.manual_seed(0)
    for model, shape in [(CNN4C3F(width=8, in_channels=3, input_size=32), (3, 32, 32)),
                         (MadryResNet(units=1), (3, 32, 32)), (DigitsCNN(), (1, 8, 8))]:
        model.eval()
        x = torch.rand(2, *shape)
        with torch.no_grad():
            z_ref, logits_ref = model.forward_with_latent(x)
            model.to(memory_format=torch.channels_last)
            z, logits = model.forward_with_latent(x.contiguous(memory_format=torch.channels_last))
        # Flatten follows the logical (C, H, W) order whatever the memory layout: z is the same vector.
        torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [
    lambda: DigitsCNN(),
    lambda: Tensorized(DigitsCNN(), theta=0.8),
    lambda: FeatureSqueezing(DigitsCNN(), bits=4),
], ids=["digits", "tensorized", "squeezed"])
def test_compiled_network_runs_forward_with_latent_compiled(make, fresh_dynamo):
    """``network.compile()`` compiles ``__call__``; forward_with_latent must go through it (one full graph),
    also at a second batch size (a smaller last batch: dynamo recompiles with a symbolic batch dimension)."""
    torch.manual_seed(0)
    model = make().eval()
    counter = CompileCounter()
    for n, frames in [(4, 1), (5, 2)]:
        x = _digits(n)
        with torch.no_grad(), randomness_off(model):
            z_ref, logits_ref = model.forward_with_latent(x)
            if n == 4:
                model.compile(backend=counter, fullgraph=True)
            z, logits = model.forward_with_latent(x)
        assert counter.frame_count == frames and counter.op_count > 0
        torch.testing.assert_close(z, z_ref)
        torch.testing.assert_close(logits, logits_ref)


def test_compiled_latent_equals_eager_with_gradients(fresh_dynamo):
    """The real compilers: inductor (C++ code generation) for the values, AOT autograd for the input gradient
    an attack or ADR's loss takes through (z, logits). Inductor with autograd would double a ~20 s compile."""
    torch.manual_seed(0)
    eager = DigitsCNN(width=4, hidden=8).eval()
    x = _digits().requires_grad_(True)
    z_ref, logits_ref = eager.forward_with_latent(x)
    g_ref = torch.autograd.grad(logits_ref.sum() + z_ref.square().sum(), x)[0]
    traced = copy.deepcopy(eager)
    traced.compile(backend="aot_eager")
    z, logits = traced.forward_with_latent(x)
    g = torch.autograd.grad(logits.sum() + z.square().sum(), x)[0]
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    inductor = copy.deepcopy(eager)
    inductor.compile()
    with torch.no_grad():
        z, logits = inductor.forward_with_latent(x)
    torch.testing.assert_close(z, z_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, logits_ref.detach(), atol=1e-5, rtol=1e-5)


# ---- MadryResNet --------------------------------------------------------------------------------------------
def madry_hand_count(filters=(16, 16, 32, 64), units=5, in_channels=3, num_classes=10) -> int:
    """Parameters by hand: a unit (a -> b) is BN(a) + conv3x3(a, b) + BN(b) + conv3x3(b, b), no bias, no
    shortcut weights; plus the stem conv, the final BN and the linear layer."""
    def unit(a, b):
        return 2 * a + 9 * a * b + 2 * b + 9 * b * b
    total = 9 * in_channels * filters[0]
    for s in range(3):
        total += unit(filters[s], filters[s + 1]) + (units - 1) * unit(filters[s + 1], filters[s + 1])
    return total + 2 * filters[3] + filters[3] * num_classes + num_classes


def test_madry_resnet_shapes_and_parameter_count():
    # 432 (stem) + 5 x 4,672 (stage 1) + 13,920 + 4 x 18,560 (stage 2) + 55,488 + 4 x 73,984 (stage 3)
    # + 128 (final BN) + 650 (linear) = 464,154.
    assert madry_hand_count() == 464_154
    model = MadryResNet()
    assert sum(p.numel() for p in model.parameters()) == 464_154
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 5 * 2 and all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    assert [c.out_channels for c in convs[1::2]] == [16] * 5 + [32] * 5 + [64] * 5
    assert model.feature_dim == model.latent_dim == 64 and model.head.in_features == 64
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 10) and model.forward_features(x).shape == (2, 64)
    with torch.device("meta"):  # the reference file's wide w28-10 network, by the same hand count
        wide = MadryResNet(filters=[16, 160, 320, 640])
        assert sum(p.numel() for p in wide.parameters()) == madry_hand_count((16, 160, 320, 640))
    for bad in ([16, 32, 16, 64], [16, 17, 32, 64], [16, 16, 32]):
        with pytest.raises(ValueError, match="filters"):
            MadryResNet(filters=bad)
    with pytest.raises(ValueError, match="not both"):
        MadryResNet(mean=CIFAR10_MEAN, std=CIFAR10_STD, per_image_standardization=True)


def reference_madry_forward(model: MadryResNet, x: torch.Tensor) -> torch.Tensor:
    """Madry's model.py written out with functional ops on ``model``'s weights (eval-mode BN)."""
    def bn(mod, t):
        return F.batch_norm(t, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, 1e-3)

    def lrelu(t):
        return torch.where(t < 0, 0.1 * t, t)

    def residual(u, t, stride, in_f, out_f, activate_before_residual):
        if activate_before_residual:
            t = lrelu(bn(u.bn1, t))
            orig = t
        else:
            orig = t
            t = lrelu(bn(u.bn1, t))
        t = F.conv2d(t, u.conv1.weight, stride=stride, padding=1)
        t = F.conv2d(lrelu(bn(u.bn2, t)), u.conv2.weight, padding=1)
        if in_f != out_f:
            orig = F.avg_pool2d(orig, stride, stride)
            p = (out_f - in_f) // 2
            orig = torch.cat([orig.new_zeros(orig.shape[0], p, *orig.shape[2:]), orig,
                              orig.new_zeros(orig.shape[0], p, *orig.shape[2:])], dim=1)
        return t + orig

    t = model.normalize(x)
    t = F.conv2d(t, model.conv1.weight, padding=1)
    filters = [16, 16, 32, 64]
    for s, (stage, stride) in enumerate(zip((model.stage1, model.stage2, model.stage3), (1, 2, 2))):
        for i, u in enumerate(stage):
            in_f = filters[s] if i == 0 else filters[s + 1]
            t = residual(u, t, stride if i == 0 else 1, in_f, filters[s + 1], s == 0 and i == 0)
    t = lrelu(bn(model.bn, t)).mean(dim=(2, 3))
    return F.linear(t, model.head.weight, model.head.bias)


def test_madry_resnet_matches_a_functional_reference():
    torch.manual_seed(0)
    model = MadryResNet(mean=CIFAR10_MEAN, std=CIFAR10_STD)
    # Non-trivial BN statistics so that a swapped BN or a misplaced activation shows.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_madry_forward(model, x), atol=1e-4, rtol=1e-4)


def test_madry_resnet_per_image_standardization_and_init():
    torch.manual_seed(0)
    a = MadryResNet(per_image_standardization=True, units=1).eval()
    b = MadryResNet(units=1).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 32, 32)
    x[1] = 0.5  # a constant image: std 0, so the reference divides by 1 / sqrt(N) instead
    n = 3 * 32 * 32
    mean = x.flatten(1).mean(1).view(2, 1, 1, 1)
    std = ((x - mean) ** 2).flatten(1).mean(1).sqrt().clamp(min=1 / math.sqrt(n)).view(2, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b((x - mean) / std), atol=1e-5, rtol=1e-5)
    # Initialization of the reference: convs N(0, 2 / (9 out)), linear U(+-sqrt(3 / in)), zero bias.
    big = MadryResNet(filters=[16, 160, 320, 640], units=1)
    w = big.stage3[0].conv2.weight
    assert abs(w.std().item() - math.sqrt(2 / (9 * 640))) < 0.02 * math.sqrt(2 / (9 * 640))
    assert big.head.weight.abs().max() <= math.sqrt(3 / 640) and torch.all(big.head.bias == 0)
