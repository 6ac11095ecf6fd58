"""SoundNet5 (advtrain.networks.soundnet): shapes, the 512-d flatten, input validation, gradients, binarization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain.networks import XNOR, SoundNet5, binarize
from advtrain.networks.soundnet import soundnet5_lengths


def _waveform(batch: int = 2, length: int = 16000) -> torch.Tensor:
    return torch.rand(batch, 1, length) * 2 - 1


def test_output_and_feature_shapes():
    torch.manual_seed(0)
    net = SoundNet5()
    x = _waveform(3)
    assert net(x).shape == (3, 12)
    assert net.forward_features(x).shape == (3, 256)
    assert net.feature_dim == 256 and isinstance(net.head, nn.Linear) and net.head.in_features == 256
    net.eval()
    torch.testing.assert_close(net(x), net.head(net.forward_features(x)))


def test_conv_layers_and_the_512_flatten():
    net = SoundNet5()
    convs = [m for m in net.features if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (1, 16, 64, 2, 32), (16, 32, 32, 2, 16), (32, 64, 16, 2, 8), (64, 128, 8, 2, 4), (128, 256, 4, 2, 2)]
    assert len([m for m in net.features if isinstance(m, nn.MaxPool1d)]) == 5
    assert soundnet5_lengths(16000) == [2000, 250, 31, 8, 2]
    assert net.flatten_dim == 512
    assert net.features(_waveform(2)).shape == (2, 512)
    assert net.classifier[0].in_features == 512 and net.classifier[0].out_features == 256
    assert SoundNet5(pool_sizes=(8, 8, 2, 1, 2)).flatten_dim == 512


def test_wrong_input_shape_is_a_clear_error():
    net = SoundNet5()
    with pytest.raises(ValueError, match=r"\(B, 1, 16000\)"):
        net(_waveform(2, 8000))
    with pytest.raises(ValueError, match="16000"):
        net(torch.rand(2, 16000))
    with pytest.raises(ValueError, match="16000"):
        net(torch.rand(2, 2, 16000))
    with pytest.raises(ValueError, match="pool sizes"):
        SoundNet5(pool_sizes=(4, 4))
    with pytest.raises(ValueError, match="too short"):
        SoundNet5(input_length=100)


def test_backward_reaches_input_and_every_parameter():
    torch.manual_seed(0)
    net = SoundNet5()
    x = _waveform(4).requires_grad_(True)
    nn.functional.cross_entropy(net(x), torch.tensor([0, 3, 7, 11])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())


def test_binarized_soundnet_keeps_first_conv_and_head_real():
    torch.manual_seed(0)
    net = binarize(SoundNet5())
    assert type(net.features[0]) is nn.Conv1d and type(net.head) is nn.Linear
    xnors = [m for m in net.modules() if isinstance(m, XNOR)]
    assert len(xnors) == 5  # convs 2-5 and the 512 -> 256 linear
    assert isinstance(net.classifier[0], XNOR)
    x = _waveform(2).requires_grad_(True)
    out = net(x)
    assert out.shape == (2, 12)
    out.sum().backward()
    assert x.grad.abs().sum() > 0
