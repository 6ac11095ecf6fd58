"""Feature squeezing (advtrain.networks.squeeze) against scipy, its attack surrogates (attacks/surrogates.py), BPDA
on a trained digits model, and loading a plain checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from advtrain.attacks import pgd
from advtrain.attacks.surrogates import known_surrogates, surrogate_label, use_bpda, use_surrogate
from advtrain.networks import XNOR, Binarized, DigitsCNN, FeatureSqueezing


def _reference(x: torch.Tensor, bits: int | None, size: int) -> np.ndarray:
    """Xu et al.'s squeezer with numpy and scipy, one (H, W) channel at a time."""
    a = x.double().numpy()
    if bits is not None:
        a = np.round(a * (2**bits - 1)) / (2**bits - 1)
    out = np.empty_like(a)
    for b in range(a.shape[0]):
        for c in range(a.shape[1]):
            out[b, c] = ndimage.median_filter(a[b, c], size=size)  # mode 'reflect', origin 0: the defaults
    return out


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (3, 3, 7, 9), (1, 3, 5, 4), (2, 1, 1, 6), (1, 3, 16, 15)])
@pytest.mark.parametrize(("bits", "size"), [(5, 2), (5, 3), (None, 2), (3, 4), (5, 1)])
def test_squeezer_equals_bit_depth_rounding_then_scipy_median_filter(shape, bits, size):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    squeezer = FeatureSqueezing(nn.Identity(), bits=bits, median_size=size)
    expected = torch.from_numpy(_reference(x, bits, size))
    torch.testing.assert_close(squeezer(x), expected, atol=0, rtol=0)
    # float32: the rounding runs in float32, then the median picks one of those values (no arithmetic).
    torch.testing.assert_close(squeezer(x.float()), expected.float(), atol=1e-7, rtol=0)
    if size > 1:  # the filter does something, else the comparison above proves nothing about it
        plain = FeatureSqueezing(nn.Identity(), bits=bits, median_size=1)(x)
        assert not torch.equal(plain, expected)


def test_squeezer_any_memory_format_and_bf16():
    x = torch.rand(2, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    squeezer = FeatureSqueezing(nn.Identity())
    expected = squeezer(x)
    torch.testing.assert_close(squeezer(x.to(memory_format=torch.channels_last)), expected, atol=0, rtol=0)
    torch.testing.assert_close(squeezer(x.transpose(2, 3).contiguous().transpose(2, 3)), expected, atol=0, rtol=0)
    # bf16: the rounding runs in float32 and casting is monotonic, so the median of the cast levels is the cast
    # of the float32 result on the same (bf16) input.
    xb = x.bfloat16()
    out = squeezer(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, squeezer(xb.float()).bfloat16(), atol=0, rtol=0)


def test_arguments_are_validated():
    for bad in (0, -1, 17, 2.5, True):
        with pytest.raises(ValueError, match="bits"):
            FeatureSqueezing(nn.Identity(), bits=bad)
    for bad in (0, 1.5, False):
        with pytest.raises(ValueError, match="median_size"):
            FeatureSqueezing(nn.Identity(), median_size=bad)
    with pytest.raises(ValueError, match="exact, identity, oblivious"):
        FeatureSqueezing(nn.Identity(), surrogate="ste")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        FeatureSqueezing(nn.Identity())(torch.rand(8, 8))
    model = FeatureSqueezing(nn.Identity())
    model.surrogate = "bogus"  # as a careless setattr would: forward refuses rather than guessing
    with pytest.raises(ValueError, match="bogus"):
        model(torch.rand(1, 1, 4, 4))


def _small_cnn() -> FeatureSqueezing:
    torch.manual_seed(0)
    return FeatureSqueezing(DigitsCNN(width=8, hidden=16)).eval()


def _input_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    model(x).logsumexp(1).sum().backward()
    return x.grad


def test_surrogates_exact_identity_oblivious(digits_tensors):
    model = _small_cnn()
    x = digits_tensors[0][:16]
    squeezed = model.squeeze(x)
    assert not torch.equal(squeezed, x)
    # exact: rounding's derivative is zero, so no gradient reaches the input (gradient masking).
    assert _input_grad(model, x).abs().max() == 0
    with use_bpda(model):
        assert model.surrogate == "identity"
        torch.testing.assert_close(model(x), model.network(squeezed), atol=0, rtol=0)  # forward still squeezes
        g_bpda = _input_grad(model, x)
    assert g_bpda.abs().sum() > 0
    torch.testing.assert_close(g_bpda, _input_grad(model.network, squeezed), atol=0, rtol=0)
    with use_surrogate(model, "oblivious"):
        torch.testing.assert_close(model(x), model.network(x), atol=0, rtol=0)
        torch.testing.assert_close(_input_grad(model, x), _input_grad(model.network, x), atol=0, rtol=0)
    assert model.surrogate == "exact"
    with pytest.raises(RuntimeError), use_surrogate(model, "identity"):
        raise RuntimeError("attack failed")
    assert model.surrogate == "exact"
    # forward_features squeezes too, so head(forward_features(x)) == forward(x) for every surrogate
    for name in FeatureSqueezing.SURROGATES:
        with use_surrogate(model, name):
            torch.testing.assert_close(model.head(model.forward_features(x)), model(x))
    assert model.feature_dim == 16 and model.head is model.network.head


def test_surrogate_names_and_labels_of_both_families():
    assert XNOR.SURROGATES == ("ste", "tanh", "tanh0.75") and XNOR.BPDA == "ste"
    assert {"ste", "tanh", "tanh0.75", "exact", "identity", "oblivious"} <= set(known_surrogates())
    assert surrogate_label("tanh") == "sign'=tanh" and surrogate_label("oblivious") == "squeeze=oblivious"
    with pytest.raises(ValueError, match="no module of FeatureSqueezing declares it.*exact, identity"):
        with use_surrogate(_small_cnn(), "tanh"):
            pass
    # a squeezed binary network: bpda switches both families, each to its own BPDA, and restores both
    model = FeatureSqueezing(Binarized(DigitsCNN(width=8, hidden=16), surrogate="tanh"))
    xnors = [m for m in model.modules() if isinstance(m, XNOR)]
    with use_bpda(model):
        assert model.surrogate == "identity" and all(m.surrogate == "ste" for m in xnors)
    assert model.surrogate == "exact" and all(m.surrogate == "tanh" for m in xnors)


def test_bpda_beats_the_oblivious_attack_and_exact_gradients_are_masked(digits_tensors):
    """The 2x2 median filter blurs an 8x8 digit so much that a classifier trained on clean digits gets ~72% on
    squeezed ones; the MLP is trained on squeezed digits instead (~97%), which is what a deployed squeezer's
    classifier would be tuned to. Measured: clean 0.967, exact 0.922, oblivious 0.312, BPDA 0.174 (training and
    attack seeds 0-5: BPDA 0.15-0.21, oblivious 0.30-0.33, exact 0.88-0.92), so the orderings have margin."""
    x_train, y_train, x, y = digits_tensors
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model = FeatureSqueezing(net, bits=5, median_size=2)
    squeezed = model.squeeze(x_train)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(net(squeezed), y_train).backward()
        opt.step()
    model.eval()

    def accuracy(x_adv: torch.Tensor) -> float:  # always on the real squeezed model
        assert model.surrogate == "exact"
        with torch.no_grad():
            return (model(x_adv).argmax(1) == y).float().mean().item()

    def attack() -> torch.Tensor:
        return pgd(model, x, y, 0.15, steps=20, generator=torch.Generator().manual_seed(1))

    clean, exact = accuracy(x), accuracy(attack())
    with use_bpda(model):
        x_bpda = attack()
    with use_surrogate(model, "oblivious"):
        x_oblivious = attack()
    bpda, oblivious = accuracy(x_bpda), accuracy(x_oblivious)
    assert clean > 0.9
    assert exact > clean - 0.1  # masked: PGD is left with its random start
    assert bpda <= oblivious  # knowing the squeezer (BPDA) helps the attacker
    assert bpda < exact - 0.5


def test_checkpoint_loads_a_plain_networks_weights(tmp_path):
    torch.manual_seed(0)
    plain = DigitsCNN(width=8, hidden=16)
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {f"network.{k}": v for k, v in plain.state_dict().items()}}, path)
    torch.manual_seed(1)
    model = FeatureSqueezing(DigitsCNN(width=8, hidden=16), checkpoint=str(path)).eval()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(model.network.state_dict()[k], v, atol=0, rtol=0)
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(model(x), plain.eval()(model.squeeze(x)))
    with pytest.raises(FileNotFoundError, match="unsqueezed"):
        FeatureSqueezing(DigitsCNN(), checkpoint=str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="does not match"):  # another architecture: other parameter names
        FeatureSqueezing(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), checkpoint=str(path))
