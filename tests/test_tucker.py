"""Tucker-parametrized layers and the tensorize transform (defensive tensorization)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks import DigitsCNN, Tensorized, TuckerConv, TuckerLinear, keep_probability, randomness_off, tensorize
from networks.tucker import is_tensorized, load_plain_weights, tucker_ranks


def _layers():
    torch.manual_seed(0)
    return [nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Conv1d(4, 10, 5, padding=2), nn.Linear(12, 7)]


def _input(layer):
    if isinstance(layer, nn.Conv2d):
        return torch.randn(3, 6, 9, 9)
    if isinstance(layer, nn.Conv1d):
        return torch.randn(3, 4, 20)
    return torch.randn(3, 12)


def _tucker(layer, **kwargs):
    return (TuckerLinear if isinstance(layer, nn.Linear) else TuckerConv)(layer, **kwargs)


@pytest.mark.parametrize("index", range(3))
def test_full_rank_at_theta_one_reproduces_the_original_layer(index):
    layer = _layers()[index]
    x = _input(layer)
    tucker = _tucker(layer, rank=1.0, theta=1.0)
    torch.testing.assert_close(tucker(x), layer(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tucker.weight, layer.weight, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("index", range(3))
def test_theta_below_one_redraws_in_train_and_eval_and_randomness_off_restores(index):
    layer = _layers()[index]
    x = _input(layer)
    tucker = _tucker(layer, rank=1.0, theta=0.7)
    for mode in (True, False):
        tucker.train(mode)
        torch.manual_seed(1)
        a, b = tucker(x), tucker(x)
        assert not torch.allclose(a, b), f"two forwards agree in {'train' if mode else 'eval'} mode"
        with randomness_off(tucker):
            torch.testing.assert_close(tucker(x), tucker(x), atol=0, rtol=0)
            torch.testing.assert_close(tucker(x), layer(x), atol=1e-5, rtol=1e-4)
    assert tucker.theta == 0.7  # restored on exit


def test_mask_shapes_never_change_and_small_modes_stay_whole():
    tucker = TuckerConv(nn.Conv2d(6, 8, 3), theta=0.2)
    assert tucker.ranks == [8, 6, 3, 3] and tucker.masked_modes == [0, 1]  # 3x3 spatial modes: not masked
    torch.manual_seed(0)
    seen_empty = False
    for _ in range(200):
        masks = tucker.draw_masks()
        assert [m.shape for m in masks] == [torch.Size([8]), torch.Size([6])]
        assert set(torch.cat(masks).unique().tolist()) <= {0.0, 1 / 0.2}
        seen_empty |= bool((masks[1] == 0).all())
        assert tucker.weight.shape == (8, 6, 3, 3)
    assert seen_empty  # at theta 0.2 a whole mode is sometimes dropped, and the shapes still do not change


def test_the_sketched_weight_is_unbiased():
    torch.manual_seed(0)
    layer = nn.Conv2d(5, 6, 3)
    tucker = TuckerConv(layer, theta=0.8)
    with torch.no_grad():
        mean = torch.stack([tucker.weight for _ in range(4000)]).mean(0)
    # E[w] = w with the 1/theta rescaling; without it the mean would be theta^2 = 0.64 times w
    assert (mean - layer.weight).abs().max() < 0.1 * layer.weight.abs().max()


def test_masks_act_on_the_latent_rank_of_the_sketched_core():
    """With lambda masking mode 0, the weight equals the core with those rank components zeroed, projected back."""
    torch.manual_seed(0)
    tucker = TuckerLinear(nn.Linear(6, 5), theta=0.5, min_dim=0)
    masks = [torch.tensor([2.0, 0, 2, 0, 2]), torch.tensor([0.0, 2, 2, 2, 2])]
    core = tucker.core * (masks[0][:, None] * masks[1][None, :])
    u0, u1 = tucker.factors
    torch.testing.assert_close(tucker.reconstruct(masks), u0 @ core @ u1.T)


def test_tensorize_replaces_chosen_layers_and_keeps_the_function():
    torch.manual_seed(0)
    net = DigitsCNN().eval()
    x = torch.rand(4, 1, 8, 8)
    reference = net(x)
    tensorize(net, rank=1.0, theta=0.9, layers=["Conv2d"])
    kinds = {type(m).__name__ for m in net.modules()}
    assert "TuckerConv" in kinds and "TuckerLinear" not in kinds and "Linear" in kinds
    with randomness_off(net):
        torch.testing.assert_close(net(x), reference, atol=1e-5, rtol=1e-4)
    assert not torch.equal(net(x), net(x))
    assert is_tensorized(net)


def test_tensorize_exclude_and_errors():
    net = DigitsCNN()
    first_conv = next(name for name, m in net.named_modules() if isinstance(m, nn.Conv2d))
    tensorize(net, exclude=[first_conv])
    assert isinstance(net.get_submodule(first_conv), nn.Conv2d)
    with pytest.raises(ValueError, match="not modules"):
        tensorize(DigitsCNN(), exclude=["no_such_layer"])
    with pytest.raises(ValueError, match="keep probability"):
        tensorize(DigitsCNN(), theta=1.5)
    with pytest.raises(ValueError, match="layers may contain"):
        tensorize(DigitsCNN(), layers=["Conv3d"])
    with pytest.raises(ValueError, match="no"):
        tensorize(nn.Sequential(nn.ReLU()))


def test_low_rank_decomposition_approximates_and_ranks_are_capped():
    assert tucker_ranks((64, 3, 3, 3), 1.0) == [27, 3, 3, 3]  # a mode's rank <= its unfolding's rank
    assert tucker_ranks((64, 32, 3, 3), 16) == [16, 16, 3, 3]
    assert tucker_ranks((64, 32, 3, 3), 0.5) == [32, 16, 2, 2]
    with pytest.raises(ValueError):
        tucker_ranks((4, 4), [5, 4])
    torch.manual_seed(0)
    # a weight of multilinear rank (4, 4, 3, 3) is recovered exactly at that rank
    core = torch.randn(4, 4, 3, 3)
    a, b = torch.randn(16, 4), torch.randn(12, 4)
    layer = nn.Conv2d(12, 16, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.einsum("abcd,ia,jb->ijcd", core, a, b))
    tucker = TuckerConv(layer, rank=[4, 4, 3, 3])
    torch.testing.assert_close(tucker.weight, layer.weight, atol=1e-4, rtol=1e-3)


def test_keep_probability_context_sets_and_restores():
    net = tensorize(DigitsCNN(), theta=0.9)
    with keep_probability(net, 0.5):
        assert {m.theta for m in net.modules() if isinstance(m, (TuckerConv, TuckerLinear))} == {0.5}
    assert {m.theta for m in net.modules() if isinstance(m, (TuckerConv, TuckerLinear))} == {0.9}


def test_the_randomized_forward_compiles_without_graph_breaks():
    """Fixed-shape masks: the whole forward is one graph (fullgraph=True fails on a break or a host sync)."""
    torch.manual_seed(0)
    net = tensorize(DigitsCNN(), theta=0.8)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    out = compiled(torch.rand(2, 1, 8, 8))
    assert out.shape == (2, 10)


def test_tensorized_wrapper_initializes_from_a_plain_checkpoint(tmp_path):
    torch.manual_seed(0)
    plain = DigitsCNN().eval()
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {f"network.{k}": v for k, v in plain.state_dict().items()}}, path)
    wrapped = Tensorized(DigitsCNN(), rank=1.0, theta=0.9, checkpoint=str(path)).eval()
    x = torch.rand(4, 1, 8, 8)
    with randomness_off(wrapped):
        torch.testing.assert_close(wrapped(x), plain(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(wrapped.head(wrapped.forward_features(x)), plain(x), atol=1e-5, rtol=1e-4)
    assert wrapped.feature_dim == plain.feature_dim
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tensorized(DigitsCNN(), checkpoint=str(tmp_path / "missing.ckpt"))
    torch.save({"state_dict": {"network.other.weight": torch.zeros(1)}}, tmp_path / "wrong.ckpt")
    with pytest.raises(ValueError, match="does not match"):
        load_plain_weights(DigitsCNN(), tmp_path / "wrong.ckpt")
