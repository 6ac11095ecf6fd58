"""AutoAttack composed from torchattacks components: the official settings, the cascade (later attacks
see only still-robust points), strength against PGD-100 with restarts, the rand version with EOT and
its majority rule, budgets, and reproducibility."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn

from advtrain.attacks import pgd
from advtrain.attacks.autoattack import AUTOATTACK_VERSION, STAGES, autoattack, autoattack_run, build_stages

EPS = 0.15  # digits, PGD-trained MLP: robust accuracy well between 0 and clean


def _mlp(dropout: float | None = None) -> nn.Sequential:
    layers = [nn.Flatten(), nn.Linear(64, 64), nn.ReLU()]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(64, 10))


def _train(model, x, y, *, eps=None, epochs=60):
    """Full-batch Adam; with eps, on PGD-10 examples (Madry) so that robust accuracy is not ~0."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        x_in = x if eps is None else pgd(model, x, y, eps, steps=10, generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_in), y).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def robust_mlp(digits_tensors):
    x, y, _, _ = digits_tensors
    torch.manual_seed(0)
    return _train(_mlp(), x, y, eps=0.1).eval()


@pytest.fixture(scope="module")
def dropout_mlp(digits_tensors):
    """A randomized model: dropout stays active at test time (the caller keeps it in train mode)."""
    x, y, _, _ = digits_tensors
    torch.manual_seed(0)
    return _train(_mlp(dropout=0.3), x, y, eps=0.1).train()


def _spied(cls, log):
    """A torchattacks class that records every call of ``forward`` and the target classes it uses."""

    class Spy(cls):
        def forward(self, images, labels):
            out = super().forward(images, labels)
            log.append({"component": cls.__name__, "x": images.clone(), "y": labels.clone(), "out": out.clone(),
                        "attack": self})
            return out

        def attack_single_run(self, *args, **kwargs):
            self.__dict__.setdefault("seen_targets", []).append(getattr(self, "target_class", None))
            return super().attack_single_run(*args, **kwargs)

        def attack_single_run_targeted(self, *args, **kwargs):
            self.__dict__.setdefault("seen_targets", []).append(self.target_class)
            return super().attack_single_run_targeted(*args, **kwargs)

    Spy.__name__ = cls.__name__
    return Spy


@pytest.fixture(scope="module")
def standard_run(robust_mlp, digits_tensors):
    """One standard Linf AutoAttack on 100 test digits, with every component spied on."""
    _, _, x_test, y_test = digits_tensors
    x, y = x_test[:100], y_test[:100]
    log = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("APGD", "APGDT", "FAB", "Square"):
            mp.setattr(torchattacks, name, _spied(getattr(torchattacks, name), log))
        x_adv, report = autoattack_run(robust_mlp, x, y, EPS, norm="Linf", version="standard", seed=0)
    return x, y, x_adv, report, log


def _correct(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) == y


def test_report_lists_the_four_standard_stages_with_the_official_settings(standard_run):
    *_, report, log = standard_run
    assert report["source"] == AUTOATTACK_VERSION
    assert (report["version"], report["norm"], report["eps"], report["n_classes"]) == ("standard", "linf", EPS, 10)
    names = [a["name"] for a in report["attacks"]]
    assert names == ["apgd-ce", "apgd-t", "fab-t", "square"]
    s = {a["name"]: a["settings"] for a in report["attacks"]}
    assert s["apgd-ce"] == {"norm": "Linf", "eps": EPS, "seed": 0, "verbose": False, "steps": 100, "n_restarts": 1,
                            "rho": 0.75, "loss": "ce", "eot_iter": 1}
    assert s["apgd-t"]["steps"] == 100 and s["apgd-t"]["n_restarts"] == 1 and s["apgd-t"]["n_target_classes"] == 9
    assert s["fab-t"]["multi_targeted"] is True and s["fab-t"]["steps"] == 100 and s["fab-t"]["n_target_classes"] == 9
    assert (s["fab-t"]["alpha_max"], s["fab-t"]["eta"], s["fab-t"]["beta"]) == (0.1, 1.05, 0.9)
    assert s["square"]["n_queries"] == 5000 and s["square"]["p_init"] == 0.8
    assert s["square"]["resc_schedule"] is False and s["square"]["loss"] == "margin"
    # the settings are what the torchattacks objects actually hold
    objects = {entry["component"]: entry["attack"] for entry in log}
    assert objects["APGD"].steps == 100 and objects["APGD"].loss == "ce" and objects["APGD"].eot_iter == 1
    assert objects["APGDT"].steps == 100 and objects["FAB"].steps == 100
    assert objects["Square"].n_queries == 5000 and objects["Square"].rescale_schedule is False
    assert [a["component"] for a in report["attacks"]] == ["torchattacks.APGD", "torchattacks.APGDT",
                                                           "torchattacks.FAB", "torchattacks.Square"]


def test_targeted_stages_use_exactly_nine_target_classes(standard_run):
    *_, log = standard_run
    objects = {entry["component"]: entry["attack"] for entry in log}
    for name in ("APGDT", "FAB"):
        assert objects[name].n_target_classes == 9
        # the 2nd ... 10th most likely classes, each attacked once (one restart)
        assert sorted(objects[name].seen_targets) == list(range(2, 11)), name


@pytest.mark.parametrize("n_classes, targets", [(20, 9), (100, 9), (5, 4)])
def test_target_count_is_min_of_nine_and_classes_minus_one(n_classes, targets):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, n_classes))
    stages = {name: (attack, settings) for name, attack, settings in
              build_stages(model, 0.1, norm="Linf", version="standard", n_classes=n_classes)}
    for name in ("apgd-t", "fab-t"):
        attack, settings = stages[name]
        assert attack.n_target_classes == settings["n_target_classes"] == targets


def test_robust_accuracy_no_higher_than_pgd100_with_restarts(standard_run, robust_mlp):
    x, y, x_adv, report, _ = standard_run
    clean = _correct(robust_mlp, x, y).sum().item()
    aa = _correct(robust_mlp, x_adv, y).sum().item()
    x_pgd = pgd(robust_mlp, x, y, EPS, steps=100, restarts=5, generator=torch.Generator().manual_seed(0))
    pgd_robust = _correct(robust_mlp, x_pgd, y).sum().item()
    assert 0 < aa < clean  # eps is in the informative range
    assert aa <= pgd_robust, (aa, pgd_robust)
    assert report["robust"] == aa  # the report's count is the returned examples' accuracy


def test_later_stages_see_only_still_robust_points(standard_run, robust_mlp):
    x, y, _, report, log = standard_run
    assert [e["component"] for e in log] == ["APGD", "APGDT", "FAB", "Square"]
    clean_ok = _correct(robust_mlp, x, y)
    assert torch.equal(log[0]["x"], x[clean_ok]) and torch.equal(log[0]["y"], y[clean_ok])
    for before, after, stage in zip(log, log[1:], report["attacks"][1:]):
        still = _correct(robust_mlp, before["out"], before["y"])
        assert torch.equal(after["x"], before["x"][still]) and torch.equal(after["y"], before["y"][still])
        assert len(after["x"]) == stage["attacked"]
    counts = [report["clean_correct"]] + [a["robust_after"] for a in report["attacks"]]
    assert [a["attacked"] for a in report["attacks"]] == counts[:-1]
    assert counts[1] < counts[0]  # the cascade did shrink


def test_clean_misclassified_points_are_not_attacked_and_returned_unchanged(standard_run, robust_mlp):
    x, y, x_adv, report, log = standard_run
    wrong = ~_correct(robust_mlp, x, y)
    assert wrong.any()
    assert torch.equal(x_adv[wrong], x[wrong])
    assert report["clean_correct"] == int((~wrong).sum()) == len(log[0]["x"])
    # and they count as non-robust
    assert not _correct(robust_mlp, x_adv[wrong], y[wrong]).any()


def test_first_successful_example_is_kept(standard_run, robust_mlp):
    x, y, x_adv, _, log = standard_run
    first = log[0]
    broken = ~_correct(robust_mlp, first["out"], first["y"])
    assert broken.any()
    rows = torch.nonzero(_correct(robust_mlp, x, y)).flatten()[broken]
    assert torch.equal(x_adv[rows], first["out"][broken])


def test_linf_budget_and_range(standard_run):
    x, _, x_adv, _, _ = standard_run
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_l2_budget_range_and_strength(robust_mlp, digits_tensors):
    _, _, x_test, y_test = digits_tensors
    x, y = x_test[:32], y_test[:32]
    eps = 1.0
    x_adv, report = autoattack_run(robust_mlp, x, y, eps, norm="l2", seed=0)
    assert report["norm"] == "l2" and report["attacks"][0]["settings"]["norm"] == "L2"
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    robust = _correct(robust_mlp, x_adv, y).sum().item()
    assert robust == report["robust"] < report["clean_correct"]
    x_pgd = pgd(robust_mlp, x, y, eps, steps=100, norm="l2", restarts=5, generator=torch.Generator().manual_seed(0))
    assert robust <= _correct(robust_mlp, x_pgd, y).sum().item()


def test_deterministic_given_seed_and_leaves_caller_state_alone(robust_mlp, digits_tensors):
    _, _, x_test, y_test = digits_tensors
    x, y = x_test[:24], y_test[:24]
    robust_mlp.zero_grad(set_to_none=True)
    rng = torch.get_rng_state()
    lines = []
    first = autoattack(robust_mlp, x, y, EPS, seed=3, log=lines.append)
    assert [line.split()[2].rstrip(":") for line in lines] == list(STAGES["standard"])  # one progress line per stage
    assert torch.equal(torch.get_rng_state(), rng)  # torchattacks reseeds the global RNG: it is restored
    assert all(p.grad is None for p in robust_mlp.parameters())  # FAB's backward() is undone
    assert not robust_mlp.training and not any(m.training for m in robust_mlp.modules())
    torch.rand(5)  # a different global state must not matter
    second = autoattack(robust_mlp, x, y, EPS, seed=3)
    assert torch.equal(first, second)


def test_standard_warns_on_a_randomized_model(dropout_mlp, digits_tensors):
    _, _, x_test, y_test = digits_tensors
    x, y = x_test[:4], y_test[:4]
    with pytest.warns(RuntimeWarning, match="randomized"):
        autoattack_run(dropout_mlp, x, y, 0.0, version="standard", seed=0)


def _mean_correct_fraction(model, x, y, draws, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with torch.no_grad():
            return torch.stack([(model(x).argmax(1) == y).double() for _ in range(draws)]).mean().item()


def test_rand_uses_eot_on_the_randomized_model_and_beats_plain_apgd(dropout_mlp, digits_tensors):
    _, _, x_test, y_test = digits_tensors
    x, y = x_test[:48], y_test[:48]
    eps = 0.1
    calls = []  # (batch size, dropout active) per forward pass
    handle = dropout_mlp.register_forward_hook(lambda m, i, o: calls.append((i[0].shape[0], m[3].training)))
    try:
        x_adv, report = autoattack_run(dropout_mlp, x, y, eps, version="rand", seed=0)
    finally:
        handle.remove()
    assert dropout_mlp.training and dropout_mlp[3].training  # the caller's mode is kept ...
    assert all(active for _, active in calls)  # ... also during the attack: dropout stayed random
    assert [a["name"] for a in report["attacks"]] == ["apgd-ce", "apgd-dlr"]
    assert report["eot_draws"] == 20 and report["check_draws"] == 20
    for stage, loss in zip(report["attacks"], ("ce", "dlr")):
        assert stage["settings"]["eot_iter"] == 20 and stage["settings"]["loss"] == loss
        assert stage["settings"]["steps"] == 100 and stage["driver"].startswith("attack_single_run")
    # every APGD gradient is the mean of 20 forward/backward passes: >= 20 * (100 + 1) passes per stage
    first = report["attacks"][0]["attacked"]
    assert sum(1 for n, _ in calls if n == first) >= 20 * 101
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1

    # no weaker than plain APGD-CE without EOT (judged by fresh draws, the fraction classified correctly)
    plain = torchattacks.APGD(dropout_mlp, norm="Linf", eps=eps, steps=100, n_restarts=1, seed=0, loss="ce",
                              eot_iter=1, rho=0.75, verbose=False)
    with torch.random.fork_rng():
        x_plain = plain.forward(x, y)  # forward, not __call__: __call__ would switch dropout off
    aa = _mean_correct_fraction(dropout_mlp, x_adv, y, 100, seed=1)
    base = _mean_correct_fraction(dropout_mlp, x_plain, y, 100, seed=1)
    clean = _mean_correct_fraction(dropout_mlp, x, y, 100, seed=1)
    assert aa < clean
    assert aa <= base + 0.02, (aa, base)


class _FlakyClassifier(nn.Module):
    """A deterministic classifier whose answer is replaced, in 20% of forward passes per example, by a
    random wrong class: every point is classified correctly by a clear majority of draws."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        logits = self.base(x)
        flip = torch.rand(x.shape[0]) < 0.2
        wrong = (logits.argmax(1) + torch.randint(1, 10, (x.shape[0],))) % 10
        return logits + 100.0 * flip[:, None] * nn.functional.one_hot(wrong, 10)


def test_rand_judges_points_by_a_majority_of_draws_not_one_pass(robust_mlp, digits_tensors):
    _, _, x_test, y_test = digits_tensors
    x, y = x_test[:40], y_test[:40]
    flaky = _FlakyClassifier(robust_mlp)
    truly_correct = int(_correct(robust_mlp, x, y).sum())
    # eps = 0: nothing can be broken; a one-pass check would drop about 20% of the points at each stage
    x_adv, report = autoattack_run(flaky, x, y, 0.0, version="rand", seed=0, eot_draws=2, check_draws=21)
    assert report["clean_correct"] == truly_correct
    assert [a["robust_after"] for a in report["attacks"]] == [truly_correct, truly_correct]
    assert [a["attacked"] for a in report["attacks"]] == [truly_correct, truly_correct]
    assert torch.equal(x_adv, x)
    assert "half of 21" in report["robust_rule"]


def test_rand_is_reproducible_and_takes_non_image_inputs(dropout_mlp, digits_tensors):
    _, _, x_test, y_test = digits_tensors
    x, y = x_test[:16].flatten(1), y_test[:16]  # (N, 64): viewed as (N, 1, 1, 64) for torchattacks
    runs = [autoattack_run(dropout_mlp, x, y, 0.1, version="rand", seed=5, eot_draws=4) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][0].shape == x.shape
    assert (runs[0][0] - x).abs().max() <= 0.1 + 1e-6
    assert runs[0][1]["attacks"][0]["settings"]["eot_iter"] == 4


def test_clear_errors(robust_mlp, digits_tensors):
    _, _, x_test, y_test = digits_tensors
    x, y = x_test[:4], y_test[:4]
    with pytest.raises(ValueError, match="norm"):
        autoattack(robust_mlp, x, y, 0.1, norm="L1")
    with pytest.raises(ValueError, match="version"):
        autoattack(robust_mlp, x, y, 0.1, version="plus")
    with pytest.raises(ValueError, match="eps"):
        autoattack(robust_mlp, x, y, -0.1)
    with pytest.raises(ValueError, match="eot_draws"):
        autoattack(robust_mlp, x, y, 0.1, version="rand", eot_draws=0)
    with pytest.raises(ValueError, match="n_classes"):
        autoattack(robust_mlp, x, y, 0.1, n_classes=12)  # the model has 10 logits
    with pytest.raises(ValueError, match="n_classes"):
        autoattack(robust_mlp, x, y, 0.1, n_classes=3)  # targeted DLR needs 4
    with pytest.raises(ValueError, match="image batches"):
        autoattack(robust_mlp, x.flatten(1), y, 0.1)
    with pytest.raises(ValueError, match="batch sizes"):
        autoattack(robust_mlp, x, y[:3], 0.1)
    with pytest.raises(ValueError, match="seed"):
        autoattack(robust_mlp, x, y, 0.1, seed=None)


def test_torchattacks_autoattack_is_not_the_official_protocol(robust_mlp):
    """Why the module composes the components itself (module docstring): torchattacks.AutoAttack runs
    10 iterations, n_classes - 1 targets and a rescaled Square schedule."""
    aa = torchattacks.AutoAttack(robust_mlp, norm="Linf", eps=0.1, version="standard", n_classes=100, seed=0)
    apgd, apgdt, fab, square = aa._autoattack.attacks
    assert apgd.steps == apgdt.steps == fab.steps == 10
    assert apgdt.n_target_classes == fab.n_target_classes == 99
    assert square.rescale_schedule is True


class _Quantized(nn.Module):
    """An MLP on 8-bit-rounded inputs: no input gradient, so only Square can move a point."""

    def __init__(self, features: int):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.mlp(torch.round(x * 255) / 255)


@pytest.mark.parametrize("norm, eps", [("Linf", 0.3), ("L2", 3.0)])
def test_square_windows_stay_inside_a_non_square_image(digits_tensors, monkeypatch, norm, eps):
    """8 x 32 images: Square's first windows (side 0.89 sqrt(256) = 14) would not fit the 8 rows. Capped, every
    window starts inside the image; the examples stay in budget."""
    _, _, x_test, _ = digits_tensors
    x = x_test[:32].repeat(1, 1, 1, 4)  # (N, 1, 8, 32)
    model = _Quantized(256).eval()
    y = model(x).argmax(1)  # every point starts correct, so Square runs on the points the others leave
    offsets = []
    original = torchattacks.Square.random_int

    def recorded(self, low=0, high=1, shape=[1]):  # noqa: B006 (torchattacks' signature)
        offsets.append(high)  # high = side - window: negative when the window does not fit
        return original(self, low, high, shape)

    monkeypatch.setattr(torchattacks.Square, "random_int", recorded)
    x_adv, report = autoattack_run(model, x, y, eps, norm=norm, seed=0)
    square = report["attacks"][-1]
    assert square["name"] == "square" and square["attacked"] > 0 and square["component"] == "torchattacks.Square"
    assert offsets and min(offsets) >= 0
    size = (x_adv - x).flatten(1).abs().amax(1) if norm == "Linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert size.max() <= eps + 1e-5


def test_square_on_square_images_keeps_its_schedule():
    square = build_stages(nn.Linear(1, 10), 0.1)[-1][1]
    square.p_max = 8**2 / (8 * 8)  # what forward sets for 8 x 8 images
    plain = torchattacks.Square(nn.Linear(1, 10), eps=0.1, p_init=0.8, resc_schedule=False)
    assert [square.p_selection(i) for i in range(0, 5001, 7)] == [plain.p_selection(i) for i in range(0, 5001, 7)]
