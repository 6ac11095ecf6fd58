"""Tucker-parametrized layers and the tensorize transform (defensive tensorization)."""

from __future__ import annotations

import itertools

import pytest
import tensorly as tl
import torch
from torch import nn

from advtrain.networks import (
    DigitsCNN,
    Tensorized,
    TuckerConv,
    TuckerLinear,
    keep_probability,
    randomness_off,
    tensorize,
)
from advtrain.networks.tensorize import load_plain_weights
from advtrain.networks.tucker import (
    contraction_order,
    is_tensorized,
    reconstruction_macs,
    tucker_ranks,
    tucker_to_weight,
)


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


# The reconstruction (advtrain.networks.tucker.tucker_to_weight) is the tensor tensorly's tucker_to_tensor gives:
# weights of
# linear (2-D), conv1d (3-D) and conv2d (4-D) layers, at full rank, below it, with spatial ranks below the kernel
# size, with 1x1 kernels, in every order of the products and on both paths (oneDNN 1x1 convolutions, matmuls).
RANK_PATTERNS = [
    ((7, 12), [7, 12]), ((7, 12), [3, 5]), ((10, 512), [10, 10]),
    ((10, 4, 5), [10, 4, 5]), ((10, 4, 5), [6, 2, 3]), ((16, 8, 1), [8, 8, 1]),
    ((8, 6, 3, 3), [8, 6, 3, 3]), ((8, 6, 3, 3), [5, 4, 2, 3]), ((9, 5, 1, 1), [9, 5, 1, 1]),
    ((6, 4, 3, 5), [2, 3, 1, 4]), ((64, 3, 3, 3), [27, 3, 3, 3]), ((32, 48, 3, 3), [32, 20, 3, 3]),
]


def _random_tucker(shape, ranks, theta=0.6):
    core = torch.randn(ranks, dtype=torch.float64)
    factors = [torch.randn(d, r, dtype=torch.float64) for d, r in zip(shape, ranks, strict=True)]
    masked = [f * (torch.rand(f.shape[1], dtype=torch.float64) < theta) / theta for f in factors]
    return core, masked


@pytest.mark.parametrize(("shape", "ranks"), RANK_PATTERNS)
def test_the_reconstruction_is_tensorlys_tucker_to_tensor_in_every_order_and_on_both_paths(shape, ranks):
    torch.manual_seed(sum(shape) + sum(ranks))
    core64, factors64 = _random_tucker(shape, ranks)
    expected = tl.tucker_to_tensor((core64, factors64))
    core, factors = core64.float(), [f.float() for f in factors64]
    steps = (0, 1, 2) if len(shape) > 2 else (0, 1)
    assert contraction_order(shape, ranks) in set(itertools.permutations(steps))
    for order in [None, *itertools.permutations(steps)]:
        for onednn in (None, True, False):
            weight = tucker_to_weight(core, factors, order, onednn=onednn)
            assert weight.shape == shape and weight.is_contiguous() and weight.dtype == torch.float32
            torch.testing.assert_close(weight.double(), expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)
    with pytest.raises(ValueError, match="permutation"):
        tucker_to_weight(core, factors, (0,))


@pytest.mark.filterwarnings("ignore:Trying to compute SVD")  # tensorly's HOSVD of the small layers at rank 0.5
@pytest.mark.parametrize("index", range(3))
def test_layer_reconstruct_with_masks_is_tensorlys_reconstruction_of_the_masked_factors(index):
    layer = _layers()[index]
    for rank in (1.0, 0.5):
        tucker = _tucker(layer, rank=rank, theta=0.7, min_dim=1)
        torch.manual_seed(3)
        masks = tucker.draw_masks()
        factors = [f * m for f, m in zip(tucker.factors, masks, strict=True)]  # min_dim 1: every mode is masked
        torch.testing.assert_close(tucker.reconstruct(masks), tl.tucker_to_tensor((tucker.core, factors)),
                                   atol=1e-5, rtol=1e-4)


def test_contraction_order_puts_the_cheapest_products_first():
    assert contraction_order((64, 64, 3, 3), [64, 64, 3, 3]) == (0, 1, 2)  # full rank: all orders cost the same
    assert contraction_order((12, 7), [12, 7]) == (0, 1)
    assert contraction_order((64, 64, 3, 3), [32, 32, 2, 2])[-1] == 2  # the spatial products grow 4 -> 9: last
    assert contraction_order((64, 8, 3, 3), [4, 8, 3, 3])[-1] == 0  # rank 4 -> 64 outputs: last
    assert reconstruction_macs((512, 512, 3, 3), [512, 512, 3, 3]) == 2 * 512 ** 3 * 9 + 512 * 512 * 81


def _wide_conv(dim, rank=1.0, **kwargs):
    torch.manual_seed(0)
    conv = (nn.Conv1d if dim == 1 else nn.Conv2d)(48, 40, 3, **kwargs)
    return conv, TuckerConv(conv, rank=rank, theta=0.7)


def test_which_channel_modes_a_conv_factors_depends_on_the_input_and_the_rank():
    """At full rank the 1x1 convolutions pay when the input and output have few positions; below it, the narrower
    kernel pays at any size."""
    _, tucker = _wide_conv(2, padding=1)
    small, large = torch.randn(2, 48, 5, 5), torch.randn(64, 48, 32, 32)
    assert tucker.factored_modes(small) == (True, True) and tucker.factored_modes(small[0]) == (True, True)
    assert tucker.factored_modes(large) == (False, False)
    assert _wide_conv(2, rank=0.5, padding=1)[1].factored_modes(large) == (True, True)
    # a strided conv reads 4x the positions it writes: only the output mode is left to a 1x1 conv
    _, strided = _wide_conv(2, stride=2, padding=1)
    assert strided.factored_modes(torch.randn(2, 48, 14, 14)) == (False, True)
    tucker.factorize = False
    assert tucker.factored_modes(small) == (False, False)


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("kwargs", [{"padding": 1}, {"stride": 2, "dilation": 2, "padding": 2, "bias": False},
                                    {"padding": "same"}, {"padding": "valid"}])
@pytest.mark.parametrize("modes", [(False, True), (True, False), (True, True)])
def test_factored_channel_modes_compute_the_same_function_with_the_same_draw(dim, kwargs, modes):
    """Channel modes applied as 1x1 convs: the same outputs, gradients and RNG use as the dense weight's conv."""
    conv, tucker = _wide_conv(dim, **kwargs)
    small = torch.randn(2, 48, *[5] * dim)
    outputs = {}
    for chosen in (modes, (False, False)):
        tucker.factored_modes = lambda x, chosen=chosen: chosen
        x = small.clone().requires_grad_()
        torch.manual_seed(5)
        y = tucker(x)
        state = torch.get_rng_state()
        grads = torch.autograd.grad(y.square().sum(), [x, tucker.core, *tucker.factors])
        outputs[chosen] = (y, state, grads, tucker(small[0]))
    (y, state, grads, unbatched), (y_dense, state_dense, grads_dense, _) = outputs[modes], outputs[False, False]
    assert torch.equal(state, state_dense)  # one mask draw either way
    torch.testing.assert_close(y, y_dense, atol=1e-5, rtol=1e-4)
    for g, g_dense in zip(grads, grads_dense, strict=True):
        torch.testing.assert_close(g, g_dense, atol=1e-4 * g_dense.abs().max().item(), rtol=1e-4)
    assert unbatched.shape == y[0].shape
    with randomness_off(tucker):
        torch.testing.assert_close(tucker(small), conv(small), atol=1e-5, rtol=1e-4)


def test_the_factored_forward_compiles_without_graph_breaks():
    _, tucker = _wide_conv(2, padding=1)
    x = torch.randn(2, 48, 5, 5)
    assert tucker.factored_modes(x) == (True, True)
    compiled = torch.compile(tucker, backend="eager", fullgraph=True)
    torch.manual_seed(0)
    expected = tucker(x)
    torch.manual_seed(0)
    torch.testing.assert_close(compiled(x), expected)


@pytest.mark.parametrize("index", range(3))
def test_bf16_autocast_reconstructs_and_runs(index):
    layer = _layers()[index]
    x = _input(layer)
    tucker = _tucker(layer, rank=1.0, theta=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight = tucker.weight
        y = tucker(x)
    assert weight.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    torch.testing.assert_close(weight.float(), layer.weight, atol=0.05, rtol=0.05)
    torch.testing.assert_close(y.float(), layer(x), atol=0.1, rtol=0.05)
    _, wide = _wide_conv(2, padding=1)
    small = torch.randn(2, 48, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16), randomness_off(wide):
        factored = wide(small)
        wide.factorize = False
        dense = wide(small)
    assert factored.dtype == dense.dtype == torch.bfloat16
    torch.testing.assert_close(factored.float(), dense.float(), atol=0.05, rtol=0.05)
