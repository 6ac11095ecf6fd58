"""RobustnessEvaluation: randomized models, sanity checks, resumable evaluation."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from advtrain.callbacks import RobustnessEvaluation
from advtrain.datamodules import Digits
from advtrain.defenses import Standard
from advtrain.evaluation import Accuracy, EvaluationResults, SettingResult, sanity_verdicts

SUITE = [{"attack": "fgsm", "eps": [0.05, 0.1]}, {"attack": "pgd", "eps": [0.05, 0.1], "steps": 10}]


class Net(nn.Module):
    def __init__(self, dropout: float = 0.0, gradient: str = "normal", scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)
        self.dropout, self.gradient, self.scale = dropout, gradient, scale

    def forward(self, x):
        x = x / self.scale
        if self.gradient == "zero":  # same outputs, no gradient reaches the input
            x = x.detach()
        h = self.body(x)
        if self.dropout:  # test-time randomness
            h = F.dropout(h, self.dropout, training=True)
        return self.head(h)


@pytest.fixture(scope="module")
def trained_net(tmp_path_factory):
    torch.manual_seed(0)
    model = Standard(network=Net(), eps=0.1, val_attack={"steps": 1})
    pl.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
               inference_mode=False, limit_val_batches=0).fit(model, datamodule=Digits())
    return model.network.state_dict()


class ScaledDigits(Digits):
    """Digits served in [0, 255]: a wrong input range for attacks that assume [0, 1]."""

    def preprocess(self, batch, train):
        x, y = super().preprocess(batch, train)
        return x * 255, y


def evaluate(tmp_path, state, data=None, **kwargs):
    net_kwargs = {k: kwargs.pop(k) for k in ("dropout", "gradient", "scale") if k in kwargs}
    network = Net(**net_kwargs)
    network.load_state_dict(state)
    model = Standard(network=network, eps=0.1)
    trainer_precision = kwargs.pop("trainer_precision", "32-true")
    evaluation = RobustnessEvaluation(attacks=kwargs.pop("attacks", SUITE), **kwargs)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False,
                         default_root_dir=tmp_path, callbacks=[evaluation], precision=trainer_precision)
    trainer.test(model, datamodule=data or Digits(), verbose=False)
    return evaluation


def failed(results):
    return {v["check"] for v in results["sanity"]["verdicts"] if not v["passed"]}


def test_a_normal_model_passes_every_sanity_check(tmp_path, trained_net):
    results = evaluate(tmp_path, trained_net).results.to_dict()
    assert not results["randomized"] and results["draws"] == 1
    assert failed(results) == set()
    checks = {v["check"] for v in results["sanity"]["verdicts"]}
    assert checks == {"eps0_equals_clean", "large_eps_near_zero", "monotone_in_eps", "iterative_beats_single_step",
                      "more_iterations_not_weaker"}
    assert "sanity" in (tmp_path / "robustness.md").read_text().lower()


def test_zero_gradients_fail_the_large_budget_check(tmp_path, trained_net):
    with pytest.warns(UserWarning, match="large_eps_near_zero"):
        results = evaluate(tmp_path, trained_net, gradient="zero").results.to_dict()
    assert "large_eps_near_zero" in failed(results)
    verdict = next(v for v in results["sanity"]["verdicts"] if v["check"] == "large_eps_near_zero")
    assert "gradient masking" in verdict["likely_cause"]


def test_a_wrong_input_range_fails_the_eps_zero_check(tmp_path, trained_net):
    results = evaluate(tmp_path, trained_net, data=ScaledDigits(), scale=255.0).results.to_dict()
    assert "eps0_equals_clean" in failed(results)


def test_randomized_model_is_detected_and_judged_over_draws(tmp_path, trained_net):
    evaluation = evaluate(tmp_path, trained_net, dropout=0.3, draws=6, limit=120)
    results = evaluation.results.to_dict()
    assert results["randomized"] and results["draws"] == 6 and "no EOT" in results["note"]
    for a in results["attacks"]:
        assert a["accuracy_worst"] <= a["accuracy"] and a["accuracy_std"] >= 0
        assert max(results["per_example"][a["name"]]) <= 6  # per example: number of draws it survived
    assert results["clean"]["accuracy_std"] > 0  # the draws really differ
    # a deterministic model is not treated as randomized
    assert not evaluate(tmp_path, trained_net, limit=120).results.to_dict()["randomized"]


class DtypeRecorder(Net):
    """Records the dtype of the logits whenever an attack takes a gradient through the network."""

    seen: set = set()

    def forward(self, x):
        logits = super().forward(x)
        if torch.is_grad_enabled():
            DtypeRecorder.seen.add(logits.dtype)
        return logits


def test_evaluation_runs_in_float32_whatever_the_trainer_precision_and_bf16_only_on_request(tmp_path, trained_net):
    float32 = evaluate(tmp_path / "fp32", trained_net, limit=100).results
    under_bf16 = evaluate(tmp_path / "bf16", trained_net, limit=100, trainer_precision="bf16-mixed").results
    assert under_bf16.per_example == float32.per_example and under_bf16.precision == "32"
    assert [a.setting["precision"] for a in under_bf16.attacks] == ["32"] * len(under_bf16.attacks)
    assert "ran in float32" in under_bf16.path.with_suffix(".md").read_text()

    network = DtypeRecorder()
    network.load_state_dict(trained_net)
    for precision, expected in (("32", {torch.float32}), ("bf16-mixed", {torch.bfloat16})):
        DtypeRecorder.seen = set()
        evaluation = RobustnessEvaluation(attacks=SUITE[1:], limit=50, precision=precision, sanity_checks=False)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False,
                             default_root_dir=tmp_path / precision, callbacks=[evaluation], precision="bf16-mixed")
        trainer.test(Standard(network=network, eps=0.1), datamodule=Digits(), verbose=False)
        assert DtypeRecorder.seen == expected, precision
        assert evaluation.results.precision == precision
    assert "not float32" in evaluation.results.path.with_suffix(".md").read_text()


class BackendRecorder(Net):
    """Records cuDNN's and CUDA matmul's flags whenever an attack takes a gradient through the network (the test
    loop's own forward passes run without gradients, under the trainer's flags)."""

    seen: set = set()

    def forward(self, x):
        cudnn = torch.backends.cudnn
        if torch.is_grad_enabled():
            BackendRecorder.seen.add((cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32,
                                      torch.backends.cuda.matmul.allow_tf32))
        return super().forward(x)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_evaluation_uses_deterministic_cudnn_and_no_tf32_and_restores_the_trainers_flags(tmp_path, trained_net,
                                                                                         precision):
    """gpu.yaml and ddp.yaml set benchmark: true, and cuDNN's autotuning may pick other algorithms in each DDP
    process; cuDNN's convolutions also use TF32 by default, which is not float32. On the CPU the flags are only
    flags, so they are what this test reads."""
    network = BackendRecorder()
    network.load_state_dict(trained_net)
    BackendRecorder.seen = set()
    evaluation = RobustnessEvaluation(attacks=SUITE[1:], limit=20, precision=precision, sanity_checks=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False,
                         default_root_dir=tmp_path, callbacks=[evaluation], benchmark=True)
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
              torch.backends.cuda.matmul.allow_tf32)
    trainer.test(Standard(network=network, eps=0.1), datamodule=Digits(), verbose=False)
    tf32 = before[2:] if precision == "bf16-mixed" else (False, False)
    assert BackendRecorder.seen == {(False, True, *tf32)}
    assert before[0] is True  # Trainer(benchmark=True)
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32) == before


def test_the_precision_is_part_of_the_cache_fingerprint():
    from advtrain.attacks import AttackSetting
    from advtrain.evaluation import fingerprint

    settings = AttackSetting("pgd", eps=0.1).expand()
    keys = {precision: fingerprint(settings, [], 0, "test", 100, 50, 1, "abc", precision)
            for precision in ("32", "bf16-mixed")}
    assert keys["32"] != keys["bf16-mixed"]
    assert keys["32"] == fingerprint(settings, [], 0, "test", 100, 50, 1, "abc")  # float32: as before the option


def test_draws_below_two_are_rejected():
    with pytest.raises(ValueError, match="draws"):
        RobustnessEvaluation(draws=1)


@pytest.mark.parametrize("randomized", [False, True], ids=["deterministic", "randomized"])
def test_interrupted_evaluation_resumes_with_only_the_missing_batches(tmp_path, trained_net, randomized):
    """The resumed evaluation equals an uninterrupted one example for example, also for a randomized network: its
    randomness in each batch is seeded by the batch, not drawn from wherever the global generator happens to be."""
    net = {"dropout": 0.3} if randomized else {}
    more = {"attacks": SUITE, **({"draws": 3, "limit": 200} if randomized else {})}
    full = evaluate(tmp_path / "full", trained_net, batch_size=50, **net, **more).results.to_dict()
    assert full["randomized"] == randomized

    class Crash(RobustnessEvaluation):
        def on_batch_done(self, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("simulated crash")

    network = Net(**net)
    network.load_state_dict(trained_net)
    model = Standard(network=network, eps=0.1)
    crash = Crash(batch_size=50, **more)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False,
                         default_root_dir=tmp_path / "resumed", callbacks=[crash])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.test(model, datamodule=Digits(), verbose=False)
    assert crash.computed_batches == [0, 1, 2]
    torch.manual_seed(12345)  # wherever the global generator stands, the missing batches draw the same
    again = evaluate(tmp_path / "resumed", trained_net, batch_size=50, **net, **more)
    assert again.computed_batches == ([3] if randomized else [3, 4, 5, 6, 7])  # in batches of 50
    resumed = json.loads((tmp_path / "resumed" / "robustness.json").read_text())
    assert resumed["per_example"] == full["per_example"]
    assert [a["correct"] for a in resumed["attacks"]] == [a["correct"] for a in full["attacks"]]
    assert resumed["clean"] == full["clean"]
    assert not list((tmp_path / "resumed" / "robustness_batches").glob("*/*.pt"))  # cleaned up


def entry(attack, eps, accuracy, steps=10, restarts=1, robust=None, **setting):
    """A suite setting's result as the sanity checks see it."""
    return SettingResult({"attack": attack, "eps": eps, "steps": steps, "restarts": restarts, "norm": "linf",
                          **setting}, name=f"{attack}-{steps} eps={eps}", score=Accuracy(0, 0, accuracy),
                         robust_fraction=robust)


def test_each_sanity_check_fires_only_on_its_violation():
    good = [entry("fgsm", 0.1, 0.5, steps=1), entry("pgd", 0.05, 0.6), entry("pgd", 0.1, 0.4),
            entry("pgd", 0.1, 0.38, steps=100)]
    assert all(v.passed for v in sanity_verdicts(0.9, good, 0.9, 0.0))
    cases = {
        "monotone_in_eps": [entry("pgd", 0.05, 0.3), entry("pgd", 0.1, 0.5)],
        "iterative_beats_single_step": [entry("fgsm", 0.1, 0.3, steps=1), entry("pgd", 0.1, 0.5)],
        "more_iterations_not_weaker": [entry("pgd", 0.1, 0.3, steps=10), entry("pgd", 0.1, 0.5, steps=100)],
    }
    for check, attacks in cases.items():
        verdicts = {v.check: v for v in sanity_verdicts(0.9, attacks, 0.9, 0.0)}
        assert not verdicts[check].passed and verdicts[check].likely_cause, check
        assert all(v.passed for name, v in verdicts.items() if name != check), check
    assert not next(v for v in sanity_verdicts(0.9, good, 0.7, 0.0) if v.check == "eps0_equals_clean").passed
    assert not next(v for v in sanity_verdicts(0.9, good, 0.9, 0.5) if v.check == "large_eps_near_zero").passed
    transfer = [SettingResult({"attack": "pgd", "eps": 0.1}, "surrogate", Accuracy(0, 0, 0.2), role="transfer",
                              white_box_accuracy=0.4)]
    assert not sanity_verdicts(0.9, good, 0.9, 0.0, transfer=transfer)[-1].passed


def test_sanity_checks_compare_only_settings_of_one_threat_model():
    """EOT, omniscient and surrogate-gradient variants are separate threat models; Kurakin's step rule is one
    family across budgets even though its step count grows with eps."""
    def check(attacks, name):
        return next(v for v in sanity_verdicts(0.9, attacks, 0.9, 0.0) if v.check == name).passed

    omniscient = entry("pgd", 0.1, 0.6, omniscient=True)  # a weaker threat model with the same steps
    assert check([entry("pgd", 0.1, 0.4), omniscient], "more_iterations_not_weaker")
    tanh = entry("pgd", 0.1, 0.2, steps=100, surrogate="tanh")
    assert check([entry("pgd", 0.1, 0.4), tanh, entry("pgd", 0.1, 0.5, steps=10, eot_samples=10)],
                 "more_iterations_not_weaker")
    kurakin = [entry("pgd", 2 / 255, 0.3, steps=2, steps_rule="kurakin"),
               entry("pgd", 8 / 255, 0.5, steps=10, steps_rule="kurakin")]
    assert not check(kurakin, "monotone_in_eps")
    assert check([entry("pgd", a.eps, a.accuracy, steps=a.setting["steps"]) for a in kurakin],
                 "monotone_in_eps")  # different step counts


def test_paired_noise_keeps_seed_noise_from_flagging_and_still_flags_real_regressions():
    """Two equally strong PGD runs on 360 examples disagree on a few borderline ones; more steps then 'raise'
    accuracy by about a point. Per-example outcomes tell that noise from a real regression."""
    def with_outcomes(steps, robust):
        return entry("pgd", 0.1, sum(robust) / len(robust), steps=steps, robust=robust)

    def verdict(attacks):
        return next(v for v in sanity_verdicts(0.9, attacks, 0.9, 0.0) if v.check == "more_iterations_not_weaker")

    base = [1.0] * 100 + [0.0] * 260
    noisy = [0.0] * 2 + [1.0] * 98 + [1.0] * 6 + [0.0] * 254  # 2 lost, 6 gained: +1.1 points
    assert not verdict([entry("pgd", 0.1, 100 / 360, 10), entry("pgd", 0.1, 104 / 360, 20)]).passed
    assert verdict([with_outcomes(10, base), with_outcomes(20, noisy)]).passed
    regressed = [1.0] * 100 + [1.0] * 40 + [0.0] * 220  # 40 examples robust only under more steps
    assert not verdict([with_outcomes(10, base), with_outcomes(20, regressed)]).passed


def test_transfer_from_a_surrogate_checkpoint_is_evaluated_and_checked(tmp_path, trained_net):
    surrogate = Net()
    torch.manual_seed(5)
    ckpt = tmp_path / "surrogate.ckpt"
    torch.save({"state_dict": {f"network.{k}": v for k, v in surrogate.state_dict().items()}}, ckpt)
    results = evaluate(tmp_path, trained_net, surrogates=[str(ckpt)]).results
    assert [t.name for t in results.transfer] == [f"transfer[surrogate] {a.name}" for a in results.attacks]
    assert {t.role for t in results.transfer} == {"transfer"} and {a.role for a in results.attacks} == {"suite"}
    for t, a in zip(results.transfer, results.attacks):
        assert t.setting["surrogate"] == str(ckpt) and t.white_box_accuracy == a.accuracy
        assert t.accuracy >= a.accuracy  # an untrained surrogate's examples transfer poorly
    checks = [v for v in results.verdicts if v.check.startswith("transfer_not_stronger")]
    assert len(checks) == len(results.transfer) and all(v.passed for v in checks)
    # the file holds the same results: written and read back, they are equal
    assert EvaluationResults.read(results.path) == results


def test_autoattack_in_the_suite_is_no_weaker_than_pgd_and_records_its_settings(tmp_path, trained_net):
    suite = [{"attack": "pgd", "eps": 0.1, "steps": 50, "restarts": 3}, {"attack": "autoattack", "eps": 0.1}]
    results = evaluate(tmp_path, trained_net, attacks=suite, limit=100).results.to_dict()
    pgd_run, aa_run = results["attacks"]
    assert aa_run["name"] == "autoattack-standard eps=0.1" and aa_run["version"] == "standard"
    assert aa_run["stages"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa_run["settings"]["target_classes"] == 9 and aa_run["settings"]["square_queries"] == 5000
    assert "torchattacks" in aa_run["implementation"]
    assert aa_run["accuracy"] <= pgd_run["accuracy"]


def test_randomized_model_gets_the_rand_autoattack(tmp_path, trained_net):
    suite = [{"attack": "autoattack", "eps": 0.1}]
    results = evaluate(tmp_path, trained_net, attacks=suite, dropout=0.3, draws=4, limit=40,
                       sanity_checks=False).results.to_dict()
    (aa_run,) = results["attacks"]
    assert results["randomized"] and aa_run["version"] == "rand"
    assert aa_run["stages"] == ["apgd-ce", "apgd-dlr"] and aa_run["settings"]["eot_draws"] == 20


def test_autoattack_setting_rejects_what_it_cannot_honour():
    from advtrain.attacks import AttackSetting

    with pytest.raises(ValueError, match="official settings"):
        AttackSetting("autoattack", eps=0.1, steps=10)
    with pytest.raises(ValueError, match="only autoattack has versions"):
        AttackSetting("pgd", eps=0.1, version="rand")


def test_a_resumed_evaluation_says_how_many_batches_it_reuses(tmp_path, trained_net, caplog):
    class Crash(RobustnessEvaluation):
        def on_batch_done(self, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("simulated crash")

    network = Net()
    network.load_state_dict(trained_net)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False,
                         default_root_dir=tmp_path, callbacks=[Crash(attacks=SUITE[:1], batch_size=50)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.test(Standard(network=network, eps=0.1), datamodule=Digits(), verbose=False)
    with caplog.at_level("INFO"):
        evaluate(tmp_path, trained_net, attacks=SUITE[:1], batch_size=50)
    assert "reusing 2 of 8 batches" in caplog.text
