"""XNOR-Net binarization (advtrain.networks.binary): the layer's formula, the sign surrogates, binarize and its
interplay with defensive tensorization."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from advtrain.networks import (
    XNOR,
    Binarized,
    DigitsCNN,
    Tensorized,
    TuckerConv,
    TuckerLinear,
    binarize,
    randomness_off,
    sign_surrogate,
    sign_with_surrogate,
    tensorize,
)
from advtrain.networks.tucker import TuckerLayer


def _sgn(v: float) -> float:
    return -1.0 if v < 0 else 1.0


def _set_bn(bn: nn.BatchNorm1d | nn.BatchNorm2d, generator: torch.Generator) -> None:
    """Known, non-trivial eval-mode statistics and affine parameters."""
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=generator, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(c, generator=generator, dtype=torch.float64) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=generator, dtype=torch.float64))
        bn.bias.copy_(torch.randn(c, generator=generator, dtype=torch.float64))
    bn.eval()


def _bn_by_hand(bn, v: float, c: int) -> float:
    mean, var = bn.running_mean[c].item(), bn.running_var[c].item()
    return (v - mean) / math.sqrt(var + bn.eps) * bn.weight[c].item() + bn.bias[c].item()


def _xnor(layer: nn.Module, seed: int = 0) -> XNOR:
    g = torch.Generator().manual_seed(seed)
    xnor = XNOR(layer.double()).double()
    _set_bn(xnor.bn, g)
    return xnor


def test_xnor_conv2d_matches_the_formula_by_hand():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    xnor = _xnor(conv)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    out = xnor(x)
    b_, c_, h, w_ = x.shape
    o_, k, stride, pad = 3, 3, 2, 1
    ho = (h + 2 * pad - k) // stride + 1
    assert out.shape == (b_, o_, ho, ho)
    W, bias = conv.weight, conv.bias
    xn = [[[[_bn_by_hand(xnor.bn, x[b, c, i, j].item(), c) for j in range(w_)] for i in range(h)]
           for c in range(c_)] for b in range(b_)]
    for b, o, i, j in itertools.product(range(b_), range(o_), range(ho), range(ho)):
        acc, a_sum = 0.0, 0.0
        for u, v in itertools.product(range(k), range(k)):
            r, q = i * stride + u - pad, j * stride + v - pad
            if not (0 <= r < h and 0 <= q < w_):
                continue  # zero padding: contributes 0 to the sign conv and to K
            for c in range(c_):
                acc += _sgn(xn[b][c][r][q]) * _sgn(W[o, c, u, v].item())
            a_sum += sum(abs(xn[b][c][r][q]) for c in range(c_)) / c_  # A = mean_c |x|
        kk = a_sum / (k * k)  # box filter 1 / (k * k)
        alpha = W[o].abs().mean().item()
        expected = acc * alpha * kk + bias[o].item()
        assert out[b, o, i, j].item() == pytest.approx(expected, rel=1e-9, abs=1e-9), (b, o, i, j)


def test_xnor_conv1d_matches_the_formula_by_hand():
    torch.manual_seed(1)
    conv = nn.Conv1d(3, 2, 4, stride=2, padding=2, bias=False)
    xnor = _xnor(conv, seed=1)
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    out = xnor(x)
    b_, c_, n = x.shape
    k, stride, pad = 4, 2, 2
    no = (n + 2 * pad - k) // stride + 1
    assert out.shape == (b_, 2, no)
    W = conv.weight
    for b, o, i in itertools.product(range(b_), range(2), range(no)):
        acc, a_sum = 0.0, 0.0
        for u in range(k):
            r = i * stride + u - pad
            if not 0 <= r < n:
                continue
            vals = [_bn_by_hand(xnor.bn, x[b, c, r].item(), c) for c in range(c_)]
            acc += sum(_sgn(vals[c]) * _sgn(W[o, c, u].item()) for c in range(c_))
            a_sum += sum(abs(v) for v in vals) / c_
        expected = acc * W[o].abs().mean().item() * a_sum / k
        assert out[b, o, i].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_xnor_linear_matches_the_formula_by_hand():
    torch.manual_seed(2)
    linear = nn.Linear(5, 3)
    xnor = _xnor(linear, seed=2)
    x = torch.randn(4, 5, dtype=torch.float64)
    out = xnor(x)
    assert out.shape == (4, 3)
    W, bias = linear.weight, linear.bias
    for b, o in itertools.product(range(4), range(3)):
        xn = [_bn_by_hand(xnor.bn, x[b, i].item(), i) for i in range(5)]
        acc = sum(_sgn(xn[i]) * _sgn(W[o, i].item()) for i in range(5))
        kk = sum(abs(v) for v in xn) / 5
        expected = acc * W[o].abs().mean().item() * kk + bias[o].item()
        assert out[b, o].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def _analytic(name: str, v: float) -> float:
    if name == "ste":
        return 1.0 if abs(v) <= 1 else 0.0
    if name == "tanh":
        return 1 - math.tanh(v) ** 2
    return 0.75 * (1 - math.tanh(0.75 * v) ** 2)


POINTS = [-3.0, -1.5, -1.0, -0.6, -0.1, 0.0, 0.3, 0.999, 1.0, 1.2, 2.5]


@pytest.mark.parametrize("surrogate", ["ste", "tanh", "tanh0.75"])
def test_surrogate_gradient_is_the_analytic_derivative(surrogate):
    x = torch.tensor(POINTS, requires_grad=True)
    upstream = torch.linspace(0.5, 2.0, len(POINTS))
    (sign_with_surrogate(x, surrogate) * upstream).sum().backward()
    expected = torch.tensor([u * _analytic(surrogate, v) for u, v in zip(upstream.tolist(), POINTS)])
    torch.testing.assert_close(x.grad, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("surrogate", ["ste", "tanh", "tanh0.75"])
def test_surrogate_under_bf16_autocast(surrogate):
    x = torch.tensor(POINTS, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sign_with_surrogate(x.to(torch.bfloat16), surrogate)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
    expected = torch.tensor([_analytic(surrogate, v) for v in POINTS])
    torch.testing.assert_close(x.grad, expected, atol=2e-2, rtol=2e-2)


def test_sign_of_zero_is_plus_one_and_outputs_are_exactly_plus_minus_one():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, -1e-30, 4.0])
    y = sign_with_surrogate(x, "ste")
    assert y.tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0, 1.0]
    z = sign_with_surrogate(torch.randn(1000), "tanh")
    assert set(z.unique().tolist()) <= {-1.0, 1.0}


def test_unknown_surrogate_names_the_valid_ones():
    with pytest.raises(ValueError, match="ste, tanh, tanh0.75"):
        sign_with_surrogate(torch.zeros(3), "sigmoid")
    with pytest.raises(ValueError, match="tanh0.75"):
        XNOR(nn.Linear(3, 2), surrogate="identity")
    with pytest.raises(ValueError, match="ste"):
        with sign_surrogate(nn.Linear(2, 2), "bogus"):
            pass


def test_weight_sign_uses_the_clipped_ste_whatever_the_activation_surrogate():
    """dL/dW by hand for a linear XNOR layer with L = sum(G * out): through sign(W) (clipped STE) and alpha."""
    torch.manual_seed(3)
    linear = nn.Linear(4, 2, bias=False).double()
    with torch.no_grad():  # some entries outside [-1, 1], where the STE passes no gradient
        linear.weight.copy_(torch.tensor([[1.7, -0.4, 0.2, -2.3], [-0.8, 1.3, 0.6, -0.05]], dtype=torch.float64))
    xnor = XNOR(linear, surrogate="tanh").double().eval()  # default BN stats: x / sqrt(1 + eps)
    x = torch.randn(3, 4, dtype=torch.float64)
    g = torch.randn(3, 2, dtype=torch.float64)
    (xnor(x) * g).sum().backward()
    W = linear.weight.detach()
    xn = x / math.sqrt(1 + xnor.bn.eps)
    s = torch.where(xn < 0, -1.0, 1.0).double()
    sw = torch.where(W < 0, -1.0, 1.0).double()
    kk = xn.abs().mean(1)
    n = W.shape[1]
    expected = torch.zeros_like(W)
    for b, o, i in itertools.product(range(3), range(2), range(n)):
        alpha = W[o].abs().mean().item()
        through_sign = alpha * s[b, i] * (1.0 if abs(W[o, i]) <= 1 else 0.0)
        through_alpha = (s[b] * sw[o]).sum() * sw[o, i] / n
        expected[o, i] += g[b, o] * kk[b] * (through_sign + through_alpha)
    torch.testing.assert_close(linear.weight.grad, expected, atol=1e-10, rtol=1e-9)


def test_xnor_reads_the_inner_weight_once_per_forward(monkeypatch):
    reads = []
    original = TuckerLayer.weight

    def counting(self):
        reads.append(1)
        return original.fget(self)

    monkeypatch.setattr(TuckerLayer, "weight", property(counting))
    for layer, x in [(TuckerConv(nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 6, 6)),
                     (TuckerConv(nn.Conv1d(3, 4, 3)), torch.randn(2, 3, 6)),
                     (TuckerLinear(nn.Linear(5, 4)), torch.randn(2, 5))]:
        xnor = XNOR(layer)
        reads.clear()
        xnor(x)
        assert len(reads) == 1


def _digits_input():
    return torch.rand(4, 1, 8, 8)


def test_binarize_keeps_first_and_last_real_and_wraps_the_rest():
    net = binarize(DigitsCNN())
    assert type(net.features[0]) is nn.Conv2d
    assert type(net.head) is nn.Linear
    assert isinstance(net.features[3], XNOR) and type(net.features[3].layer) is nn.Conv2d
    assert isinstance(net.features[7], XNOR) and type(net.features[7].layer) is nn.Linear
    assert isinstance(net.features[3].bn, nn.BatchNorm2d) and net.features[3].bn.num_features == 32
    assert isinstance(net.features[7].bn, nn.BatchNorm1d) and net.features[7].bn.num_features == 64 * 2 * 2
    assert net(_digits_input()).shape == (4, 10)


def test_binarize_keep_real_override_and_errors():
    net = binarize(DigitsCNN(), keep_real=["features.3"])
    assert isinstance(net.features[0], XNOR) and isinstance(net.head, XNOR)
    assert type(net.features[3]) is nn.Conv2d
    assert net.head.out_features == 10 and net.features[0].in_channels == 1  # forwarded attributes
    net(_digits_input()).sum().backward()
    with pytest.raises(ValueError, match="keep_real.*not"):
        binarize(DigitsCNN(), keep_real=["features.1"])
    with pytest.raises(ValueError, match="already"):
        binarize(net)
    with pytest.raises(ValueError, match="no Conv1d"):
        binarize(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="surrogate"):
        binarize(DigitsCNN(), surrogate="relu")


@pytest.mark.parametrize("order", ["binarize_then_tensorize", "tensorize_then_binarize"])
def test_binarize_and_tensorize_compose_in_either_order(order):
    torch.manual_seed(0)
    net = DigitsCNN()
    if order == "binarize_then_tensorize":
        tensorize(binarize(net), theta=0.5)
    else:
        binarize(tensorize(net, theta=0.5))
    assert isinstance(net.features[3], XNOR) and isinstance(net.features[3].layer, TuckerConv)
    assert isinstance(net.features[7], XNOR) and isinstance(net.features[7].layer, TuckerLinear)
    assert isinstance(net.features[0], TuckerConv) and isinstance(net.head, TuckerLinear)
    x = _digits_input().requires_grad_(True)
    net.train()
    net(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert net.features[3].layer.core.grad is not None and net.features[3].bn.weight.grad is not None
    net.eval()
    with torch.no_grad():
        a, b = net(x), net(x)
        assert not torch.allclose(a, b)
        with randomness_off(net):
            torch.testing.assert_close(net(x), net(x), atol=0, rtol=0)


def test_sign_surrogate_sets_and_restores():
    torch.manual_seed(0)
    net = binarize(DigitsCNN(), surrogate="ste").eval()
    layers = [m for m in net.modules() if isinstance(m, XNOR)]
    x = _digits_input()

    def input_grad():
        xg = x.clone().requires_grad_(True)
        net(xg).sum().backward()
        return xg.grad

    g_ste = input_grad()
    with sign_surrogate(net, "tanh0.75"):
        assert all(m.surrogate == "tanh0.75" for m in layers)
        g_tanh = input_grad()
    assert all(m.surrogate == "ste" for m in layers)
    assert not torch.allclose(g_ste, g_tanh)
    torch.testing.assert_close(input_grad(), g_ste)
    with pytest.raises(RuntimeError), sign_surrogate(net, "tanh"):
        raise RuntimeError("attack failed")
    assert all(m.surrogate == "ste" for m in layers)


def test_binarized_wrapper_keeps_the_interface_and_tensorizes():
    torch.manual_seed(0)
    net = Binarized(DigitsCNN(hidden=32), surrogate="tanh")
    assert net.feature_dim == 32 and net.head is net.network.head and type(net.head) is nn.Linear
    assert all(m.surrogate == "tanh" for m in net.modules() if isinstance(m, XNOR))
    x = _digits_input()
    net.eval()
    torch.testing.assert_close(net(x), net.head(net.forward_features(x)))
    assert net.forward_features(x).shape == (4, 32)
    both = Tensorized(Binarized(DigitsCNN()), theta=0.9)
    assert both(x).shape == (4, 10) and both.feature_dim == 128


def test_xnor_under_bf16_autocast_runs_forward_and_backward():
    torch.manual_seed(0)
    net = binarize(DigitsCNN())
    x = _digits_input().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
