"""DeepFool: the closed form on a linear model, an unbatched CleverHans-literal reference on a CNN, rho by hand,
invariants on a trained model, argument checks, and a smoke run of bench/deepfool_cost.py."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from cli_utils import ROOT
from torch import nn

from advtrain.attacks.deepfool import deepfool, deepfool_iterations
from advtrain.attacks.metrics import METRICS

# --- a linear 2-class model: one iteration lands (1 + overshoot) times past the boundary ----------------------

@pytest.mark.parametrize("overshoot", [0.02, 0.0])
def test_linear_two_class_model_gets_the_minimal_perturbation_in_one_iteration(overshoot):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).double()
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64)  # a box of +-100 never binds
    x_adv, iterations = deepfool_iterations(model, x, torch.zeros(8, dtype=torch.long), overshoot=overshoot,
                                            bounds=(-100.0, 100.0))

    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    logits = x.flatten(1) @ weight.T + bias
    k_hat = logits.argmax(dim=1)
    other = 1 - k_hat
    w = weight[other] - weight[k_hat]  # (8, 12)
    f_diff = logits.gather(1, other[:, None]) - logits.gather(1, k_hat[:, None])  # (8, 1)
    r = (f_diff.abs() + 1e-5) * w / w.norm(dim=1, keepdim=True) ** 2 * (1 + overshoot)
    assert len(set(k_hat.tolist())) == 2  # points on both sides of the boundary
    torch.testing.assert_close(x_adv, x + r.view_as(x), rtol=0, atol=1e-12)
    assert iterations.tolist() == [1] * 8
    with torch.no_grad():  # the 1e-5 alone carries the point past the boundary, even without overshoot
        assert (model(x_adv).argmax(dim=1) != k_hat).all()


# --- a small CNN: batched == one example at a time, following CleverHans' loop literally -----------------------

def cleverhans_deepfool(model, x0, *, steps, overshoot, candidates, linearize, bounds):
    """CleverHans' deepfool_attack for one example (1, C, H, W): at every iterate the top ``candidates`` logits
    (re-ranked) and their Jacobian by one backward call per class; returns (x_adv, iterations)."""
    adv = x0.clone()
    with torch.no_grad():
        original = current = model(adv).argmax(dim=1).item()
    r_tot = torch.zeros_like(x0)
    iteration = 0
    while current == original and iteration < steps:
        adv.requires_grad_(True)
        preds = model(adv)[0].topk(candidates).values
        grads = torch.stack([torch.autograd.grad(preds[k], adv, retain_graph=True)[0][0]
                             for k in range(candidates)])
        preds, adv = preds.detach(), adv.detach()
        pert, w = float("inf"), None
        for k in range(1, candidates):
            w_k = grads[k] - grads[0]
            f_k = preds[k] - preds[0]
            pert_k = (f_k.abs() + 1e-5) / w_k.flatten().norm()
            if pert_k < pert:
                pert, w = pert_k, w_k
        r_tot = r_tot + pert * w / w.norm()
        if linearize == "clipped":
            adv = (x0 + r_tot).clamp(*bounds)
        else:
            adv = x0 + (1 + overshoot) * r_tot
        with torch.no_grad():
            current = model(adv).argmax(dim=1).item()
        iteration += 1
    return (x0 + (1 + overshoot) * r_tot).clamp(*bounds), iteration


@pytest.fixture(scope="module")
def small_cnn(digits_tensors):
    """conv-relu-pool-linear on 1x8x8 digits, briefly trained (so boundaries are not all near the inputs), in
    float64 so that the comparison with the reference can be tight; eval mode."""
    x, y, _, _ = digits_tensors
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.double().eval()


@pytest.mark.parametrize("linearize, steps", [("clipped", 50), ("overshoot", 50), ("overshoot", 2)])
def test_batched_deepfool_matches_an_unbatched_cleverhans_reference(small_cnn, digits_tensors, linearize, steps):
    _, _, x_test, y_test = digits_tensors
    x, y = x_test[:10].double(), y_test[:10]
    kwargs = dict(steps=steps, overshoot=0.02, candidates=10, linearize=linearize, bounds=(0.0, 1.0))
    x_adv, iterations = deepfool_iterations(small_cnn, x, y, **kwargs)
    reference = [cleverhans_deepfool(small_cnn, x[i:i + 1], **kwargs) for i in range(len(x))]

    torch.testing.assert_close(x_adv, torch.cat([r[0] for r in reference]), rtol=0, atol=1e-9)
    assert iterations.tolist() == [r[1] for r in reference]
    assert len(set(iterations.tolist())) > 1  # examples finished (or were cut off) at different iterations
    if steps == 2:
        assert max(iterations.tolist()) == 2  # some were still active when the budget ran out


# --- rho and the median L2 size, by hand ------------------------------------------------------------------------

def test_rho_and_l2_median_by_hand():
    # ||x|| = 5, 10, 3 and ||r|| = 5, 1, 1.2 (3-4-5 triangles): rho = (5/5 + 1/10 + 1.2/3) / 3 = 0.5, median 1.2
    x = torch.tensor([[3.0, 4, 0, 0], [0, 0, 6, 8], [1, 2, 2, 0]]).view(3, 1, 2, 2)
    r = torch.tensor([[0.0, 0, 3, 4], [0.6, 0.8, 0, 0], [0, 0, 0, 1.2]]).view(3, 1, 2, 2)
    rho, l2 = METRICS["rho"], METRICS["l2_median"]
    assert rho.per_example(x, x + r).tolist() == pytest.approx([1.0, 0.1, 0.4], rel=1e-6)
    assert rho.summarize(rho.per_example(x, x + r)) == pytest.approx(0.5, rel=1e-6)
    assert l2.summarize(l2.per_example(x, x + r)) == pytest.approx(1.2, rel=1e-6)


# --- invariants on a trained model ------------------------------------------------------------------------------

def test_deepfool_flips_a_trained_model_within_bounds_and_ignores_y(trained_mlp, digits_tensors):
    _, _, x_test, y_test = digits_tensors
    x, y = x_test[:64], y_test[:64]
    grads_before = [None if p.grad is None else p.grad.clone() for p in trained_mlp.parameters()]
    x_adv = deepfool(trained_mlp, x, y)
    for p, before in zip(trained_mlp.parameters(), grads_before):  # gradients w.r.t. the input only
        assert (p.grad is None) if before is None else torch.equal(p.grad, before)
    assert x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        prediction = trained_mlp(x).argmax(dim=1)
        flipped = (trained_mlp(x_adv).argmax(dim=1) != prediction).float().mean()
    assert flipped >= 0.95
    assert METRICS["rho"].summarize(METRICS["rho"].per_example(x, x_adv)) < 0.5  # a small perturbation
    torch.testing.assert_close(deepfool(trained_mlp, x, (y + 1) % 10), x_adv, rtol=0, atol=0)  # y is unused
    with torch.no_grad():  # an evaluation loop calls it under no_grad
        torch.testing.assert_close(deepfool(trained_mlp, x, y), x_adv, rtol=0, atol=0)
    narrow = deepfool(trained_mlp, x, y, bounds=(0.1, 0.6))
    assert narrow.min() >= 0.1 and narrow.max() <= 0.6


def test_deepfool_under_bf16_autocast(trained_mlp, digits_tensors):
    _, _, x_test, y_test = digits_tensors
    x, y = x_test[:32], y_test[:32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = deepfool(trained_mlp, x, y)
    assert x_adv.dtype == torch.float32 and torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        flipped = (trained_mlp(x_adv).argmax(dim=1) != trained_mlp(x).argmax(dim=1)).float().mean()
    assert flipped >= 0.8


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(overshoot=-0.1), "overshoot"),
    (dict(candidates=1), "candidates"), (dict(linearize="lts4"), "linearize"),
])
def test_deepfool_rejects_bad_arguments(trained_mlp, batch, kwargs, match):
    x, y = batch
    with pytest.raises(ValueError, match=match):
        deepfool(trained_mlp, x, y, **kwargs)


def test_a_model_with_no_input_gradient_leaves_x_unchanged_instead_of_nan():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    nn.init.zeros_(model[1].weight)  # every w_k is zero: no direction to move in
    x = torch.rand(5, 1, 2, 2)
    x_adv, iterations = deepfool_iterations(model, x, torch.zeros(5, dtype=torch.long), steps=3)
    torch.testing.assert_close(x_adv, x, rtol=0, atol=0)
    assert iterations.tolist() == [3] * 5  # never flipped, cut off by the budget


def test_deepfool_with_fewer_candidates_than_classes_still_flips(trained_mlp, batch):
    x, y = batch
    x_adv = deepfool(trained_mlp, x, y, candidates=2)  # only the runner-up class of f(x0)
    with torch.no_grad():
        assert (trained_mlp(x_adv).argmax(dim=1) != trained_mlp(x).argmax(dim=1)).float().mean() >= 0.9


# --- the benchmark runs and writes what it returns (timings are for bench/, not tests) -------------------------

def test_deepfool_cost_benchmark_runs_and_writes_its_ratios(tmp_path):
    spec = importlib.util.spec_from_file_location("deepfool_cost", ROOT / "bench" / "deepfool_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "deepfool_cost.json"
    result = module.main(["--batch-size", "2", "--image-size", "8", "--steps", "3", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["ratios"] == result["ratios"] and written["seconds"] == result["seconds"]
    assert result["ratios"]["deepfool_vs_torchattacks"] > 0 and 1 <= written["mean_iterations_ours"] <= 3
