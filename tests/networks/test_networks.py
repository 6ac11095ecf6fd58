"""networks: shapes, the forward_features/head contract, Normalize, parameter counts, memory formats, bf16."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import advtrain.networks
from advtrain.networks import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CNN4C3F,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    CarliniCNN,
    DigitsCNN,
    Normalize,
    PreActResNet18,
    ResNet18,
    TorchvisionNet,
    WideResNet,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# (id, constructor, natural input shape without batch, expected feature_dim, features end in a ReLU)
CASES = [
    ("resnet18", lambda: ResNet18(mean=CIFAR10_MEAN, std=CIFAR10_STD), (3, 32, 32), 512, True),
    ("preact_resnet18", lambda: PreActResNet18(mean=CIFAR10_MEAN, std=CIFAR10_STD), (3, 32, 32), 512, True),
    # A small WRN keeps the forward cheap; WRN-34-10 is checked on the meta device below.
    ("wrn16_2", lambda: WideResNet(depth=16, widen_factor=2, dropout=0.3), (3, 32, 32), 128, True),
    ("cnn4c3f_32_mnist", lambda: CNN4C3F(width=32, mean=MNIST_MEAN, std=MNIST_STD), (1, 28, 28), 200, True),
    ("cnn4c3f_64_cifar", lambda: CNN4C3F(width=64, in_channels=3, input_size=32), (3, 32, 32), 256, True),
    ("carlini_mnist", lambda: CarliniCNN("mnist"), (1, 28, 28), 200, True),
    ("carlini_cifar", lambda: CarliniCNN("cifar", mean=CIFAR10_MEAN, std=CIFAR10_STD), (3, 32, 32), 256, True),
    ("digits", lambda: DigitsCNN(), (1, 8, 8), 128, True),
    ("tv_resnet18", lambda: TorchvisionNet("resnet18", num_classes=100), (3, 64, 64), 512, True),
    # classifier[-1] family; its features follow Hardswish + dropout, so they may be negative.
    ("tv_mobilenet_v3_small", lambda: TorchvisionNet("mobilenet_v3_small", num_classes=7), (3, 64, 64), 1024,
     False),
]


@pytest.mark.parametrize("make, shape, dim, relu", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_shapes_and_head_contract(make, shape, dim, relu):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.rand(3, *shape)
    logits = model(x)
    feats = model.forward_features(x)
    num_classes = model.head.out_features
    assert logits.shape == (3, num_classes)
    assert feats.shape == (3, dim) and model.feature_dim == dim
    assert isinstance(model.head, nn.Linear) and model.head.in_features == dim
    torch.testing.assert_close(model.head(feats), logits)
    assert torch.isfinite(logits).all()
    if relu:
        # ADR's latent z is taken after the last activation (and pooling).
        assert (feats >= 0).all() and (feats > 0).any()
    assert isinstance(model.normalize, Normalize)


def test_normalize_matches_hand_computation():
    norm = Normalize([0.5, 0.25], [0.5, 0.125])
    x = torch.tensor([[[[0.0, 1.0]], [[0.25, 0.5]]]])  # (1, 2, 1, 2)
    expected = torch.tensor([[[[(0.0 - 0.5) / 0.5, (1.0 - 0.5) / 0.5]],
                              [[(0.25 - 0.25) / 0.125, (0.5 - 0.25) / 0.125]]]])
    torch.testing.assert_close(norm(x), expected)
    assert expected.flatten().tolist() == [-1.0, 1.0, 0.0, 2.0]
    assert norm.mean.shape == (1, 2, 1, 1) and norm.std.shape == (1, 2, 1, 1)
    # Non-persistent: normalization is configuration, so it never enters checkpoints.
    assert "mean" not in norm.state_dict() and "std" not in norm.state_dict()
    assert norm.to(torch.float64)(x.double()).dtype == torch.float64


def test_normalize_identity_and_channels_last():
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(Normalize()(x), x)
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    xc = x.to(memory_format=torch.channels_last)
    out = norm(xc)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, norm(x))
    torch.testing.assert_close(out[:, 1], (x[:, 1] - 0.456) / 0.224)


@pytest.mark.parametrize(
    "mean, std, match",
    [
        ([0.5, 0.5], [0.5], "entries"),
        ([0.5], [0.0], "positive"),
        ([0.5, 0.5], [0.2, -0.1], "positive"),
        ([0.5], [float("nan")], "positive"),
        ([0.5], None, "both"),
        (None, [0.5], "both"),
    ],
)
def test_normalize_errors(mean, std, match):
    with pytest.raises(ValueError, match=match):
        Normalize(mean, std)


def test_network_rejects_mean_for_wrong_channel_count():
    with pytest.raises(ValueError, match="in_channels"):
        ResNet18(in_channels=1, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    ResNet18(in_channels=1, mean=MNIST_MEAN, std=MNIST_STD)  # fine


def test_normalization_changes_the_function():
    torch.manual_seed(0)
    a = DigitsCNN().eval()
    b = DigitsCNN(mean=[0.5], std=[0.25]).eval()
    b.load_state_dict(a.state_dict())  # same weights; mean/std are not in the state dict
    x = torch.rand(4, 1, 8, 8)
    assert not torch.allclose(a(x), b(x))
    torch.testing.assert_close(b(x), a((x - 0.5) / 0.25))


def test_resnet18_parameter_count():
    # The well-known count of kuangliu/pytorch-cifar's ResNet18 (CIFAR stem, 1x1-conv+BN shortcuts).
    assert n_params(ResNet18(num_classes=10)) == 11_173_962


def test_preact_resnet18_parameter_count():
    # kuangliu's PreActResNet18 has 11,171,146; the final BN(512) before pooling adds 2 * 512.
    assert n_params(PreActResNet18(num_classes=10)) == 11_171_146 + 1024


def test_wrn_34_10_parameter_count_and_shape_on_meta():
    with torch.device("meta"):
        model = WideResNet(depth=34, widen_factor=10, num_classes=10)
        # Verified by construction; TRADES' file reports more only because of its unused `sub_block1`.
        assert n_params(model) == 46_160_474
        assert model.feature_dim == 640
        assert model(torch.empty(2, 3, 32, 32)).shape == (2, 10)
        assert model.forward_features(torch.empty(2, 3, 32, 32)).shape == (2, 640)
        assert n_params(WideResNet(depth=28, widen_factor=10)) == 36_479_194  # WRN-28-10, Zagoruyko's 36.5M
    blocks = [m for m in model.modules() if type(m).__name__ == "WideBasicBlock"]
    assert len(blocks) == 3 * (34 - 4) // 6  # 5 blocks per group


@pytest.mark.parametrize("depth", [33, 4, 12])
def test_wide_resnet_depth_validation(depth):
    with pytest.raises(ValueError, match="6n"):
        WideResNet(depth=depth)


def test_cnn_layouts_and_parameter_counts():
    # C&W MNIST: conv 320 + 9,248 + 18,496 + 36,928, fc 1024*200+200, 200*200+200, 200*10+10 = 312,202
    # (the Keras summary of Carlini & Wagner's MNIST model).
    mnist = CarliniCNN("mnist")
    assert n_params(mnist) == 312_202 and mnist.conv_dim == 64 * 4 * 4
    cifar = CarliniCNN("cifar")
    convs = [m.out_channels for m in cifar.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [64, 64, 128, 128] and cifar.conv_dim == 128 * 5 * 5
    assert cifar.features[0].in_channels == 3
    for model, width, hidden in [(CNN4C3F(width=32), 32, 200), (CNN4C3F(width=64, in_channels=3, input_size=32),
                                                                 64, 256)]:
        # the C&W widths (docs/methods.md, ADR): width-width-pool-2 width-2 width-pool
        assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [width] * 2 + [2 * width] * 2
        assert all(m.kernel_size == (3, 3) for m in model.modules() if isinstance(m, nn.Conv2d))
        # FC -> ReLU -> Dropout(0.5) -> FC -> ReLU, then the head.
        kinds = [type(m) for m in model.classifier]
        assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU]
        assert model.classifier[2].p == 0.5 and model.classifier[0].out_features == hidden
        assert model.head.in_features == hidden
    assert CNN4C3F(width=32).to_latent(torch.rand(2, 1, 28, 28)).shape == (2, 64 * 4 * 4)
    # CNN-4C3F(32) and (64) are the C&W networks: C&W CIFAR by hand, conv 1,792 + 36,928 + 73,856 + 147,584,
    # fc 3200*256+256, 256*256+256, 256*10+10 = 1,147,978.
    assert n_params(CNN4C3F(width=32)) == n_params(mnist) == 312_202
    assert n_params(CNN4C3F(width=64, in_channels=3, input_size=32)) == n_params(cifar) == 1_147_978
    literal = CNN4C3F(width=32, second_width=32)  # the supplementary's literal four convs of 32
    assert [m.out_channels for m in literal.modules() if isinstance(m, nn.Conv2d)] == [32] * 4
    with pytest.raises(ValueError, match="variant"):
        CarliniCNN("svhn")
    with pytest.raises(ValueError, match="too small"):
        CNN4C3F(input_size=8)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = CNN4C3F(width=32)
    x = torch.rand(4, 1, 28, 28)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_digits_cnn_is_small_and_learns(digits_tensors):
    x, y, x_test, y_test = digits_tensors
    torch.manual_seed(0)
    model = DigitsCNN()
    assert n_params(model) < 100_000
    opt = torch.optim.Adam(model.parameters(), lr=0.002)
    for _ in range(15):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model.eval()(x_test).argmax(1) == y_test).float().mean().item()
    assert acc > 0.95, acc


def test_resnet18_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = ResNet18(mean=CIFAR10_MEAN, std=CIFAR10_STD).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        model = model.to(memory_format=torch.channels_last)
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make, shape", [
    (lambda: ResNet18(mean=CIFAR10_MEAN, std=CIFAR10_STD), (3, 32, 32)),
    (lambda: WideResNet(depth=10, widen_factor=1, mean=CIFAR10_MEAN, std=CIFAR10_STD), (3, 32, 32)),
    (lambda: CNN4C3F(width=32, mean=MNIST_MEAN, std=MNIST_STD), (1, 28, 28)),
], ids=["resnet18", "wrn10_1", "cnn4c3f"])
def test_bf16_autocast_forward(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.rand(4, *shape)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16  # autocast really ran the layers in bf16
    assert torch.isfinite(out).all()
    # bf16 keeps about 3 significant digits: close to float32, not equal.
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.1, err


def test_torchvision_net_replaces_fc_by_identity():
    torch.manual_seed(0)
    model = TorchvisionNet("resnet18", num_classes=100)
    assert isinstance(model.model.fc, nn.Identity)
    # The head moved out of the model, not duplicated.
    assert n_params(model) == n_params(torchvision.models.resnet18(num_classes=100))
    assert model.normalize.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert model.normalize.std.flatten().tolist() == pytest.approx(IMAGENET_STD)
    mobile = TorchvisionNet("mobilenet_v3_small", num_classes=7)
    assert isinstance(mobile.model.classifier[-1], nn.Identity) and mobile.head.out_features == 7


def test_torchvision_net_errors():
    with pytest.raises(ValueError, match="final nn.Linear"):
        TorchvisionNet("squeezenet1_0")
    with pytest.raises(ValueError, match="unknown"):
        TorchvisionNet("not_a_model")
    with pytest.raises(ValueError, match="in_channels"):
        TorchvisionNet("resnet18", in_channels=1)


def test_torchvision_net_pretrained_gets_new_head(monkeypatch):
    """With weights, num_classes is not passed to torchvision (it would refuse) and a fresh head is built."""
    calls = []

    def fake_get_model(name, weights=None, **kwargs):
        calls.append((name, weights, kwargs))
        return torchvision.models.resnet18(num_classes=1000)  # stands in for the downloaded model

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    model = TorchvisionNet("resnet18", num_classes=100, weights="IMAGENET1K_V1")
    assert calls == [("resnet18", "IMAGENET1K_V1", {})]
    assert model.head.out_features == 100 and model.head.in_features == 512
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 100)


def test_exports_and_constants():
    for name in advtrain.networks.__all__:
        assert hasattr(advtrain.networks, name)
    assert advtrain.networks.CIFAR10_MEAN == pytest.approx([0.4914, 0.4822, 0.4465])
    assert advtrain.networks.MNIST_MEAN == [0.1307] and advtrain.networks.MNIST_STD == [0.3081]
    assert len(CIFAR10_STD) == 3 and all(0.2 < s < 0.3 for s in CIFAR10_STD)
