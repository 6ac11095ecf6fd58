"""GAMA-PGD and GAMA-FW: the loss, the official schedules, an independent transcription of the official
algorithm, and the invariants every attack in the package keeps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advtrain.attacks import fgsm
from advtrain.attacks.gama import gama_fw, gama_loss, gama_pgd, gama_step_schedule, gama_weight_schedule
from advtrain.attacks.losses import margin


@pytest.fixture
def cnn():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 10)).eval()


@pytest.fixture
def batch(digits_tensors):
    x, y, _, _ = digits_tensors
    return x[:64], y[:64]  # a power of two: the reference's batch mean scales gradients exactly


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def reference_gama(model, x, y, eps, *, steps, step, w_reg, lin, sched, drop, generator, fw=False,
                   p_at_clean=False):
    """A line-by-line transcription of val-iisc/GAMA-GAT GAMA_PGD.py / GAMA_FW.py (batch-mean loss,
    argmax-gathered margin, W_REG decremented by w_reg / lin, step divided in place, box clamp then
    ball clamp), with the start clamped to the box as documented in attacks/gama.py."""
    u = torch.rand(x.shape, generator=generator)
    noise = eps * torch.sign(u - 0.5)
    start = (x + noise).clamp(0, 1)
    with torch.no_grad():
        p_ref = F.softmax(model(x if p_at_clean else start), dim=1)
    img, weight, size = start, w_reg, step
    eye = torch.eye(p_ref.shape[1])
    for t in range(steps):
        if t in sched:
            size /= drop
        img = img.detach().requires_grad_(True)
        q = F.softmax(model(img), dim=1)
        b = torch.arange(len(y))
        other = (q - 1000 * eye[y]).argmax(1)
        max_margin = (q[b, other] - q[b, y]).mean()
        if t <= lin:
            cost = weight * ((p_ref - q) ** 2).sum(1).mean(0) + max_margin
            weight -= w_reg / lin
        else:
            cost = max_margin
        (grad,) = torch.autograd.grad(cost, img)
        img = img.detach()
        if fw:
            delta = (1 - size) * (img - x) + size * eps * torch.sign(grad)
            delta = (x + delta).clamp(0, 1) - x
            img = x + delta.clamp(-eps, eps)
        else:
            adv = (img + size * torch.sign(grad)).clamp(0, 1)
            img = x + (adv - x).clamp(-eps, eps)
    return img


def test_gama_loss_on_a_hand_computed_example():
    p_adv = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    p_clean = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.6, 0.3]])
    y = torch.tensor([0, 2])
    # row 0: margin 0.3 - 0.5 = -0.2; squared distance 0.09 + 0.04 + 0.01 = 0.14 -> -0.2 + 2 * 0.14 = 0.08
    # row 1: margin 0.6 - 0.3 = 0.3; distance 0 -> 0.3
    torch.testing.assert_close(gama_loss(p_adv, p_clean, y, 2.0), torch.tensor([0.08, 0.3]))
    torch.testing.assert_close(gama_loss(p_adv, p_clean, y, 0.0), torch.tensor([-0.2, 0.3]))
    assert gama_loss(p_adv, p_clean, y, 2.0).shape == (2,)


def test_weight_schedule_decays_linearly_to_zero_at_25():
    w = gama_weight_schedule(100, 50.0, 25)
    assert len(w) == 100
    assert w[0] == 50.0 and w[1] == 48.0 and w[12] == 26.0 and w[24] == 2.0
    assert all(v == 0.0 for v in w[25:])
    assert gama_weight_schedule(6, 10.0, 4) == [10.0, 7.5, 5.0, 2.5, 0.0, 0.0]
    assert gama_weight_schedule(3, 50.0, 0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="weight"):
        gama_weight_schedule(10, -1.0, 25)


def test_step_schedule_drops_tenfold_at_60_and_85():
    s = gama_step_schedule(100, "16/255", (60, 85), 10.0)
    assert len(s) == 100
    assert s[0] == s[59] == pytest.approx(16 / 255)
    assert s[60] == s[84] == pytest.approx(1.6 / 255)
    assert s[85] == s[99] == pytest.approx(0.16 / 255)
    assert len(set(s)) == 3
    fw = gama_step_schedule(100, 0.5, (60, 85), 5.0)  # GAMA-FW's gamma
    assert (fw[0], fw[59], fw[60], fw[84], fw[85], fw[99]) == pytest.approx((0.5, 0.5, 0.1, 0.1, 0.02, 0.02))
    with pytest.raises(ValueError, match="drop_factor"):
        gama_step_schedule(10, 0.1, (5,), 0.0)


@pytest.mark.parametrize("fw", [False, True], ids=["pgd", "fw"])
def test_matches_a_transcription_of_the_official_code(cnn, batch, fw):
    x, y = batch
    eps, steps, lin, sched = 0.1, 12, 5, (4, 8)
    if fw:
        ours = gama_fw(cnn, x, y, eps, steps=steps, gamma=0.5, weight=50.0, weight_decay_steps=lin,
                       step_drops=sched, drop_factor=5.0, generator=_gen(0))
    else:
        ours = gama_pgd(cnn, x, y, eps, steps=steps, step=0.04, weight=50.0, weight_decay_steps=lin,
                        step_drops=sched, drop_factor=10.0, generator=_gen(0))
    common = dict(steps=steps, step=0.5 if fw else 0.04, w_reg=50.0, lin=lin, sched=sched,
                  drop=5.0 if fw else 10.0, fw=fw)
    theirs = reference_gama(cnn, x, y, eps, generator=_gen(0), **common)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # the details matter on this example: p(x0) at the clean input instead of the start point, or no
    # relaxation term, lead elsewhere
    assert (reference_gama(cnn, x, y, eps, generator=_gen(0), p_at_clean=True, **common) - ours).abs().max() > 1e-3
    no_relax = {**common, "w_reg": 0.0}
    assert (reference_gama(cnn, x, y, eps, generator=_gen(0), **no_relax) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("attack,kwargs", [
    (gama_pgd, {"steps": 10}), (gama_pgd, {"steps": 5, "restarts": 3}),
    (gama_fw, {"steps": 10}), (gama_fw, {"steps": 5, "restarts": 3}),
])
def test_budget_and_range_are_respected(cnn, batch, attack, kwargs):
    x, y = batch
    x_adv = attack(cnn, x, y, "8/255", generator=_gen(0), **kwargs)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).abs()
    assert delta.max() <= 8 / 255 + 1e-6
    assert delta.max() > 8 / 255 - 1e-6  # it moved, to the ball's edge somewhere
    assert all(p.grad is None for p in cnn.parameters())  # input-only gradients


def test_reproducible_with_a_generator(cnn, batch):
    x, y = batch
    for attack in (gama_pgd, gama_fw):
        a = attack(cnn, x, y, 0.1, steps=3, generator=_gen(5))
        b = attack(cnn, x, y, 0.1, steps=3, generator=_gen(5))
        c = attack(cnn, x, y, 0.1, steps=3, generator=_gen(6))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_restarts_keep_each_examples_worst_case(trained_mlp, digits_tensors):
    _, _, x, y = digits_tensors
    kw = dict(steps=30, step_drops=(18, 25), weight_decay_steps=8)
    one = gama_pgd(trained_mlp, x, y, 0.1, generator=_gen(3), **kw)
    three = gama_pgd(trained_mlp, x, y, 0.1, restarts=3, generator=_gen(3), **kw)
    # the same three runs, one after another from one generator: the first is the single run
    g = _gen(3)
    runs = [gama_pgd(trained_mlp, x, y, 0.1, generator=g, **kw) for _ in range(3)]
    assert torch.equal(runs[0], one)
    with torch.no_grad():
        logits = [trained_mlp(r) for r in runs]
        wrong = torch.stack([lg.argmax(1) != y for lg in logits])
        margins = torch.stack([margin(lg, y) for lg in logits])
        wrong_three, margin_three = trained_mlp(three).argmax(1) != y, margin(trained_mlp(three), y)
    # misclassified beats correct, then the larger margin; as misclassified means margin > 0, the
    # worst case is the run with the largest margin
    assert torch.equal(wrong_three, wrong.any(0))
    assert torch.equal(margin_three, margins.amax(0))
    assert bool((margins[0] != margins.amax(0)).any())  # the later runs did win somewhere
    assert _accuracy(trained_mlp, three, y) <= _accuracy(trained_mlp, one, y)
    assert wrong_three.sum() > wrong[0].sum()  # later restarts found more


def test_gama_pgd_is_at_least_as_strong_as_fgsm(trained_mlp, digits_tensors):
    _, _, x, y = digits_tensors
    clean = _accuracy(trained_mlp, x, y)
    acc_fgsm = _accuracy(trained_mlp, fgsm(trained_mlp, x, y, 0.1), y)
    acc_gama = _accuracy(trained_mlp, gama_pgd(trained_mlp, x, y, 0.1, steps=100, generator=_gen(0)), y)
    assert clean > 0.9
    assert acc_gama <= acc_fgsm
    assert acc_gama < clean - 0.5


def test_gama_fw_stays_in_the_ball_and_reduces_accuracy(trained_mlp, digits_tensors):
    _, _, x, y = digits_tensors
    x_adv = gama_fw(trained_mlp, x, y, 0.1, generator=_gen(0))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert _accuracy(trained_mlp, x_adv, y) < _accuracy(trained_mlp, x, y) - 0.5


def test_under_bf16_autocast_and_no_grad(trained_mlp, digits_tensors):
    _, _, x, y = digits_tensors
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        x_adv = gama_pgd(trained_mlp, x, y, 0.1, steps=30, step_drops=(18, 25), weight_decay_steps=8,
                         generator=_gen(0))
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    # iterates stay float32: most entries are not bf16 values (clean digits are k/16, exact in bf16)
    assert (x_adv != x_adv.bfloat16().float()).float().mean() > 0.3
    assert _accuracy(trained_mlp, x_adv, y) < _accuracy(trained_mlp, x, y) - 0.5


def test_rejects_impossible_arguments(cnn, batch):
    x, y = batch
    with pytest.raises(ValueError, match="steps"):
        gama_pgd(cnn, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="eps"):
        gama_pgd(cnn, x, y, "-8/255")
    with pytest.raises(ValueError, match="restarts"):
        gama_pgd(cnn, x, y, 0.1, steps=1, restarts=0)
    with pytest.raises(ValueError, match="gamma"):
        gama_fw(cnn, x, y, 0.1, steps=1, gamma=1.5)
    with pytest.raises(TypeError, match="floating-point"):
        gama_pgd(cnn, (x * 255).to(torch.uint8), y, 0.1, steps=1)
