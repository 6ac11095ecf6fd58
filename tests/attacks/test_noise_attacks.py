"""Noise baselines (uniform, SGR's LRC), R+FGSM and targeted / multi-targeted PGD against independent
references: covariances built entry by entry, hand computations on linear models, and untargeted PGD."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advtrain.attacks.core import bernoulli_start
from advtrain.attacks.losses import cross_entropy, margin
from advtrain.attacks.noise import covariance_of, lrc, lrc_noise, uniform_noise
from advtrain.attacks.standard import pgd, rfgsm
from advtrain.attacks.targeted import pgd_targeted


class ConstantLogits(nn.Module):
    """Always predicts class 0, whatever the input: never fooled on y = 0, and zero input gradient."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.logits = nn.Parameter(torch.arange(classes, 0, -1, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


class FirstCoordinateThreshold(nn.Module):
    """Class 1 exactly when the first input coordinate exceeds ``threshold``, else class 0; the class-0
    logit falls as the first coordinate rises, so the cross-entropy at y = 0 ranks draws by it."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        first = x.flatten(1)[:, :1]
        return torch.cat([-first, -first + 100 * (first - self.threshold)], dim=1)


def linear(weight) -> nn.Linear:
    model = nn.Linear(len(weight[0]), len(weight), bias=False)
    model.weight.data.copy_(torch.as_tensor(weight))
    return model.eval()


def lrc_covariance(channels: int, grid: tuple[int, int], zeta: float, rho: float) -> torch.Tensor:
    """C (x) K entry by entry, channel-major: index (c, i, j) -> c H W + i W + j."""
    h, w = grid
    cells = [(c, i, j) for c in range(channels) for i in range(h) for j in range(w)]
    expected = torch.empty(len(cells), len(cells), dtype=torch.float64)
    for a, (c, i, j) in enumerate(cells):
        for b, (d, k, m) in enumerate(cells):
            expected[a, b] = (1.0 if c == d else rho) * math.exp(-math.hypot(i - k, j - m) / zeta)
    return expected


# ---------------------------------------------------------------- LRC and uniform noise

def test_lrc_noise_has_covariance_c_kron_k():
    n = 20_000
    noise = lrc_noise((n, 2, 4, 4), zeta=2.0, channel_correlation=0.5, generator=torch.Generator().manual_seed(0))
    sample = torch.cov(noise.flatten(1).double().T)
    expected = lrc_covariance(2, (4, 4), 2.0, 0.5)
    # standard error of a sample covariance entry is at most sqrt(2 / n) for unit variances; 5 of them
    assert (sample - expected).abs().max() < 5 * math.sqrt(2 / n)
    assert noise.flatten(1).mean(0).abs().max() < 5 / math.sqrt(n)


def test_lrc_noise_on_signals_uses_positions_on_a_line():
    n = 20_000
    noise = lrc_noise((n, 1, 6), zeta=3.0, generator=torch.Generator().manual_seed(1))
    expected = torch.tensor([[math.exp(-abs(p - q) / 3.0) for q in range(6)] for p in range(6)], dtype=torch.float64)
    assert (torch.cov(noise[:, 0].double().T) - expected).abs().max() < 5 * math.sqrt(2 / n)


def test_lrc_adds_eps_times_the_noise_and_eps_is_the_per_pixel_std():
    x, y = torch.full((4000, 2, 3, 3), 0.5), torch.zeros(4000, dtype=torch.long)
    eps = 0.05
    x_adv = lrc(ConstantLogits(), x, y, eps, samples=1, zeta=2.0, generator=torch.Generator().manual_seed(2))
    unit = lrc_noise(x.shape, zeta=2.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(x_adv, (x + eps * unit).clamp(0, 1), rtol=0, atol=1e-7)
    std = ((x_adv - x) / eps).flatten(1).std(0)
    assert (std - 1).abs().max() < 0.1


def test_lrc_with_a_covariance_file(tmp_path):
    n, eps = 20_000, 0.02
    a = torch.tensor([[0.5, 0.2, 0.0, 0.1], [0.2, 1.5, 0.3, 0.0], [0.0, 0.3, 1.0, -0.2], [0.1, 0.0, -0.2, 1.0]],
                     dtype=torch.float64)  # mean diagonal 1, unequal variances
    path = tmp_path / "cov.pt"
    torch.save(7.0 * a, path)  # the rescaling to mean diagonal 1 must undo the factor 7
    x, y = torch.full((n, 1, 2, 2), 0.5), torch.zeros(n, dtype=torch.long)
    x_adv = lrc(ConstantLogits(), x, y, eps, samples=1, covariance=str(path),
                generator=torch.Generator().manual_seed(3))
    sample = torch.cov(((x_adv - x) / eps).flatten(1).double().T)
    assert (sample - a).abs().max() < 5 * math.sqrt(2 * 1.5**2 / n)

    torch.save(torch.eye(5), tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        lrc(ConstantLogits(), x[:2], y[:2], eps, covariance=str(tmp_path / "wrong.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        lrc(ConstantLogits(), x[:2], y[:2], eps, covariance=str(tmp_path / "missing.pt"))


def test_covariance_of_equals_torch_cov():
    x = torch.rand(50, 2, 3, 3, generator=torch.Generator().manual_seed(4))
    cov = covariance_of(x)
    assert cov.dtype == torch.float64 and cov.shape == (18, 18)
    torch.testing.assert_close(cov, torch.cov(x.flatten(1).double().T))


def test_lrc_refuses_more_than_4096_positions():
    x, y = torch.rand(1, 3, 65, 64), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="4096"):
        lrc(ConstantLogits(), x, y, 0.1)
    with pytest.raises(ValueError, match="4096"):
        lrc_noise((1, 1, 16000))  # a 1 s waveform
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        lrc_noise((4, 10))


def _reference_draws(attack: str, x: torch.Tensor, eps: float, samples: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if attack == "uniform":
        return [(x + (2 * torch.rand(x.shape, generator=g) - 1) * eps).clamp(0, 1) for _ in range(samples)]
    return [(x + eps * lrc_noise(x.shape, zeta=2.0, generator=g)).clamp(0, 1) for _ in range(samples)]


@pytest.mark.parametrize("attack", ["uniform", "lrc"])
def test_noise_keeps_the_worst_draw(attack):
    """An example is broken if ANY draw fools the model; otherwise the draw with the highest loss is kept.
    The draws are rebuilt from the same generator seed, one after another."""
    x, y = torch.full((200, 1, 3, 3), 0.5), torch.zeros(200, dtype=torch.long)
    eps, samples = 0.1, 8
    model = FirstCoordinateThreshold(0.5 + (0.08 if attack == "uniform" else 0.15))  # ~10% of draws fool it

    def run(k, seed):
        kwargs = {"zeta": 2.0} if attack == "lrc" else {}
        fn = uniform_noise if attack == "uniform" else lrc
        return fn(model, x, y, eps, samples=k, generator=torch.Generator().manual_seed(seed), **kwargs)

    draws = _reference_draws(attack, x, eps, samples, seed=5)
    torch.testing.assert_close(run(1, 5), draws[0], rtol=0, atol=1e-7)  # one sample: the draw as is
    result = run(samples, 5)
    with torch.no_grad():
        fooled = torch.stack([model(d).argmax(1) != y for d in draws])
        losses = torch.stack([cross_entropy(model(d), y) for d in draws])
        broken = model(result).argmax(1) != y
    assert torch.equal(broken, fooled.any(0))
    assert 0 < fooled[0].sum() < broken.sum() < len(y)  # the model is fooled by some draws only
    safe = ~broken
    torch.testing.assert_close(cross_entropy(model(result), y)[safe], losses[:, safe].max(0).values)
    assert result.min() >= 0 and result.max() <= 1
    assert torch.equal(result, run(samples, 5)) and not torch.equal(result, run(samples, 6))


def test_noise_respects_bounds():
    x = torch.tensor([0.0, 0.98, -0.99, 0.3]).repeat(64, 1).view(64, 1, 2, 2)
    y = torch.zeros(64, dtype=torch.long)
    for x_adv in (uniform_noise(ConstantLogits(), x, y, 0.1, samples=3, bounds=(-1.0, 1.0)),
                  lrc(ConstantLogits(), x, y, 0.3, samples=3, bounds=(-1.0, 1.0))):
        assert x_adv.min() >= -1 and x_adv.max() <= 1 and x_adv.min() == -1 and x_adv.max() == 1
    with torch.inference_mode():  # no gradient needed, so evaluation loops may call them in inference mode
        delta = uniform_noise(ConstantLogits(), x, y, 0.1, bounds=(-1.0, 1.0)) - x
    assert delta.abs().max() <= 0.1 + 1e-7


# ---------------------------------------------------------------- R+FGSM

def test_rfgsm_random_part_is_plus_minus_alpha():
    """With a zero input gradient only the random step remains: exactly x + alpha * (+-1) per coordinate,
    the same draw as a Bernoulli start from the same generator."""
    x, y = torch.full((32, 1, 4, 4), 0.5), torch.zeros(32, dtype=torch.long)
    x_adv = rfgsm(ConstantLogits(), x, y, 0.1, alpha=0.04, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close((x_adv - x).abs(), torch.full_like(x, 0.04), rtol=0, atol=1e-7)
    assert 0.4 < ((x_adv - x) > 0).float().mean() < 0.6
    expected = x + bernoulli_start(x, 0.04, torch.Generator().manual_seed(7))
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-7)
    default = rfgsm(ConstantLogits(), x, y, 0.1)  # alpha = eps / 2
    torch.testing.assert_close((default - x).abs(), torch.full_like(x, 0.05), rtol=0, atol=1e-7)


def test_rfgsm_on_a_linear_model_matches_a_hand_computation():
    """Two classes, logits W x: the sign of grad CE at any point is sign(w_other - w_y)."""
    w = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 1.0, 2.0]])
    x = torch.tensor([[0.5, 0.5, 0.5], [0.97, 0.5, 0.02], [0.3, 0.6, 0.5]])
    y = torch.tensor([0, 1, 1])
    eps, alpha = 0.1, 0.03
    x_adv = rfgsm(linear(w), x, y, eps, alpha=alpha, generator=torch.Generator().manual_seed(8))
    start = (x + bernoulli_start(x, alpha, torch.Generator().manual_seed(8))).clamp(0, 1)
    direction = torch.sign(w[1 - y] - w[y])
    expected = (start + (eps - alpha) * direction).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-7)
    assert x_adv[1, 0] == 1.0 and x_adv[1, 2] == 0.0  # the box clips (direction [1, -1, -1] for y = 1)


def test_rfgsm_budget_range_and_alpha_validation(trained_mlp, digits_tensors):
    _, _, x, y = digits_tensors
    x_adv = rfgsm(trained_mlp, x, y, 0.1, generator=torch.Generator().manual_seed(9))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert cross_entropy(trained_mlp(x_adv), y).mean() > 2 * cross_entropy(trained_mlp(x), y).mean()
    for bad in (0.2, -0.01):
        with pytest.raises(ValueError, match="alpha"):
            rfgsm(trained_mlp, x[:2], y[:2], 0.1, alpha=bad)


# ---------------------------------------------------------------- targeted and multi-targeted PGD

def test_multi_targeted_pgd_is_not_weaker_than_pgd(trained_mlp, digits_tensors):
    _, _, x, y = digits_tensors
    eps, steps = 0.1, 10
    untargeted = pgd(trained_mlp, x, y, eps, steps=steps, generator=torch.Generator().manual_seed(10))
    every = pgd_targeted(trained_mlp, x, y, eps, steps=steps, target="all",
                         generator=torch.Generator().manual_seed(10))
    assert (every - x).abs().max() <= eps + 1e-6 and every.min() >= 0 and every.max() <= 1
    with torch.no_grad():
        clean = (trained_mlp(x).argmax(1) == y).float().mean()
        acc_pgd = (trained_mlp(untargeted).argmax(1) == y).float().mean()
        acc_all = (trained_mlp(every).argmax(1) == y).float().mean()
    assert acc_all <= acc_pgd < clean


def test_random_target_is_another_class_and_the_prediction_reaches_it():
    """Logits 10 x on 4 inputs: pushing coordinate t up and the others down by eps = 0.5 makes t the
    prediction, so the predictions after the attack show the targets: never y, uniform over the rest."""
    n = 600
    y = torch.arange(n) % 4
    x = torch.full((n, 4), 0.3).scatter(1, y[:, None], 0.7)
    model = linear((10 * torch.eye(4)).tolist())
    x_adv = pgd_targeted(model, x, y, 0.5, steps=10, target="random", generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        prediction = model(x_adv).argmax(1)
    assert not (prediction == y).any()
    offsets = torch.bincount((prediction - y) % 4, minlength=4)
    assert offsets[0] == 0 and all(150 < int(c) < 250 for c in offsets[1:]), offsets
    target_value = x_adv.gather(1, prediction[:, None]).squeeze(1)
    torch.testing.assert_close(target_value, torch.full((n,), 0.8))  # 0.3 + eps: pulled all the way to t


def test_targeted_run_on_a_two_class_linear_model_matches_a_hand_computation():
    """K = 2: the only target is t = 1 - y and grad(-CE(Wx, t)) = (1 - p_t)(w_t - w_y), so each step adds
    step * sign(w_t - w_y) to the uniform start, then clips to the eps-ball and [0, 1]."""
    w = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 1.0, 2.0]])
    x = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.97, 0.02]])
    y = torch.tensor([0, 1])
    eps, step = 0.1, 0.03
    x_adv = pgd_targeted(linear(w), x, y, eps, step=step, steps=2, target="all",
                         generator=torch.Generator().manual_seed(12))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(12))
    point = (x + (2 * u - 1) * eps).clamp(0, 1)
    direction = torch.sign(w[1 - y] - w[y])  # [[-1, 1, 1], [1, -1, -1]]
    for _ in range(2):
        point = torch.minimum(torch.maximum(point + step * direction, x - eps), x + eps).clamp(0, 1)
    torch.testing.assert_close(x_adv, point, rtol=0, atol=1e-6)
    # with enough steps every coordinate ends on the ball's face along the direction
    far = pgd_targeted(linear(w), x, y, eps, steps=10, target="random")
    torch.testing.assert_close(far, (x + eps * direction).clamp(0, 1), rtol=0, atol=1e-6)


def test_targeted_restarts_keep_each_examples_worst_case(trained_mlp, digits_tensors):
    """The first restart is the single run (same generator stream after the target draw); later restarts
    only make an example worse w.r.t. the TRUE label: misclassified first, then a larger margin."""
    _, _, x, y = digits_tensors
    one = pgd_targeted(trained_mlp, x, y, 0.05, steps=5, generator=torch.Generator().manual_seed(13))
    three = pgd_targeted(trained_mlp, x, y, 0.05, steps=5, restarts=3, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        wrong_one, wrong_three = trained_mlp(one).argmax(1) != y, trained_mlp(three).argmax(1) != y
        margin_one, margin_three = margin(trained_mlp(one), y), margin(trained_mlp(three), y)
    assert bool((wrong_three | ~wrong_one).all()) and wrong_three.sum() > wrong_one.sum()
    same = wrong_three == wrong_one
    assert bool((margin_three[same] >= margin_one[same] - 1e-6).all())


def test_targeted_checks_its_target(trained_mlp, digits_tensors):
    x, y, _, _ = digits_tensors
    with pytest.raises(ValueError, match="target"):
        pgd_targeted(trained_mlp, x[:2], y[:2], 0.1, target="least_likely")
