"""ADR (defenses/adr.py) against hand computations, and the targeted BIM / MIM attacks against reference loops.

The loss terms are recomputed here with Python loops over examples, pairs and coordinates (numpy), from the
formulas of docs/methods.md "ADR" (the official TF code), so a wrong sign, mean, pair orientation or weight fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import DigitsMLP
from torch import nn
from torch.profiler import ProfilerActivity, profile

from advtrain.attacks import AttackSetting, bim_targeted, mim_targeted
from advtrain.defenses import ADR
from advtrain.defenses.adr import adr_terms, chunked_l1_gradient, mean_l1_distances, pair_weights
from advtrain.networks import CarliniCNN


class LatentMLP(nn.Module):
    """flatten -> Linear -> ReLU (= z) -> Linear -> head, with optional BatchNorm; the latent interface."""

    def __init__(self, hidden: int = 16, batchnorm: bool = False, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden),
                                  nn.BatchNorm1d(hidden) if batchnorm else nn.Identity(), nn.ReLU())
        self.head = nn.Linear(hidden, classes)
        self.latent_dim = hidden

    def forward_with_latent(self, x):
        z = self.body(x)
        return z, self.head(z)

    def forward(self, x):
        return self.forward_with_latent(x)[1]


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def hand_terms(z, logits, z_adv, logits_adv, y, scale=0.99):
    """Every ADR term by loops: pair (clean j, adversarial i), onehot L1 label distances normalized by their max."""
    b, dim = z.shape
    classes = logits.shape[1]
    onehot = np.eye(classes)[y]
    d = np.array([[np.abs(onehot[i] - onehot[j]).sum() for j in range(b)] for i in range(b)])
    d = d / d.max() if d.max() > 0 else d  # the TF code divides by zero here; its limit is w = 1
    w = (scale - d) / scale
    ce = [[-sum(softmax(logits[j])[c] * math.log(softmax(logits_adv[i])[c]) for c in range(classes))
           for j in range(b)] for i in range(b)]
    l1 = [[sum(abs(z[j, k] - z_adv[i, k]) for k in range(dim)) / dim for j in range(b)] for i in range(b)]
    return w, {
        "lc": sum(l1[i][i] for i in range(b)) / b,
        "smt": sum(ce[i][i] for i in range(b)) / b,
        "gc": sum(w[i, j] * l1[i][j] for i in range(b) for j in range(b)) / b**2,
        "gsmt": sum(w[i, j] * ce[i][j] for i in range(b) for j in range(b)) / b**2,
        "conf": sum(-sum(p * math.log(p) for p in softmax(logits_adv[i])) for i in range(b)) / b,
    }


def four_examples(y):
    g = torch.Generator().manual_seed(0)
    z, z_adv = torch.rand(4, 6, generator=g), torch.rand(4, 6, generator=g)
    logits, logits_adv = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    return z, logits, z_adv, logits_adv, torch.tensor(y)


@pytest.mark.parametrize("labels", [[0, 1, 0, 2], [1, 1, 1, 1]], ids=["mixed", "all_equal"])
def test_every_term_and_the_pair_weights_match_a_hand_computation(labels):
    z, logits, z_adv, logits_adv, y = four_examples(labels)
    w, expected = hand_terms(*(t.double().numpy() for t in (z, logits, z_adv, logits_adv)), y.numpy())
    weights = pair_weights(y, y)
    assert torch.allclose(weights.double(), torch.tensor(w))
    if len(set(labels)) == 1:
        assert torch.equal(weights, torch.ones(4, 4))
    else:  # same class 1, different class -1/99
        assert weights[0, 2] == 1 and weights[0, 1] == pytest.approx(-1 / 99)
    terms = adr_terms(z, logits, z_adv, logits_adv, y)
    assert set(terms) == set(expected)
    for name, value in terms.items():
        assert torch.isfinite(value)
        assert value.item() == pytest.approx(expected[name], rel=1e-5), name


def test_stop_gradients_sit_where_the_tf_code_puts_them():
    z, logits, z_adv, logits_adv, y = four_examples([0, 1, 0, 2])
    for t in (z, logits, z_adv, logits_adv):
        t.requires_grad_(True)
    terms = adr_terms(z, logits, z_adv, logits_adv, y)
    for name, clean, adversarial in (("lc", z, z_adv), ("gc", z, z_adv), ("smt", logits, logits_adv),
                                     ("gsmt", logits, logits_adv)):
        g_clean, g_adv = torch.autograd.grad(terms[name], (clean, adversarial), allow_unused=True,
                                             retain_graph=True)
        assert g_clean is None or not g_clean.any(), f"{name} sends a gradient to the clean side"
        assert g_adv.abs().sum() > 0, name
    # confidence: the full entropy gradient dH/dl_c = -p_c (log p_c + H); a stop-gradient on the soft labels
    # would make it p - sg(p) = 0
    (g,) = torch.autograd.grad(terms["conf"], logits_adv)
    p = F.softmax(logits_adv.detach(), 1)
    entropy = -(p * p.log()).sum(1, keepdim=True)
    assert g.abs().sum() > 0
    assert torch.allclose(g, -p * (p.log() + entropy) / 4, atol=1e-6)


def test_global_compactness_gradient_equals_the_naive_broadcast_and_the_chunked_one():
    g = torch.Generator().manual_seed(1)
    z_adv = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    w = torch.randn(7, 7, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad((w * mean_l1_distances(z_adv, z)).sum(), z_adv)
    (naive,) = torch.autograd.grad((w * (z[None] - z_adv[:, None]).abs().mean(-1)).sum(), z_adv)
    assert torch.allclose(ours, naive)
    # the non-CPU backward, in blocks of rows (a block of 1 row here: 7 * 5 > the patched block size)
    import advtrain.defenses.adr as adr

    old, adr._CHUNK_ELEMENTS = adr._CHUNK_ELEMENTS, 20
    try:
        assert torch.allclose(chunked_l1_gradient(w / 5, z_adv.detach(), z), naive)
    finally:
        adr._CHUNK_ELEMENTS = old


def saved_numels(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return sizes


def test_global_term_at_batch_128_with_the_cifar_cnn_latent_never_builds_a_b_b_dim_tensor():
    torch.manual_seed(0)
    net = CarliniCNN("cifar")  # CNN-4C3F(64) of the ADR supplementary: 64-64-pool-128-128-pool, FC 256-256
    with torch.no_grad():  # z: 128 channels x 5 x 5 (32 -> 30 -> 28 -> 14 -> 12 -> 10 -> 5)
        z_probe = net.forward_with_latent(torch.rand(2, 3, 32, 32))[0]
    b, dim = 128, z_probe.shape[1]
    assert dim == 128 * 5 * 5
    z = torch.rand(b, dim)
    z_adv = torch.rand(b, dim, requires_grad=True)
    y = torch.arange(b) % 10

    def global_term():
        return adr_terms(z, torch.zeros(b, 10), z_adv, torch.zeros(b, 10), y, terms=("gc",))["gc"]

    assert max(saved_numels(global_term)) == b * dim  # z_a, sg(z) (B x dim) and (B, B) distances and weights
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        global_term().backward()
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest < b * b * dim * 4 / 32  # nothing near a (B, B, dim) float32 block (210 MB)
    # the detector sees a naive broadcast (B, B, dim) at a small batch
    small = z_adv[:16].detach().requires_grad_(True)
    assert max(saved_numels(lambda: (z[None, :16] - small[:, None]).abs().mean())) == 16 * 16 * dim


def test_with_every_term_off_adr_is_the_half_half_mixture_and_weights_add_up(batch):
    x, y = batch
    torch.manual_seed(0)
    net = LatentMLP()
    off = ADR(net, eps=0.1, attack={"steps": 3}, lc=0, smt=0, gc=0, gsmt=0, conf=0)
    torch.manual_seed(1)
    out = off.defense_loss(x, y, 0)
    mixture = 0.5 * F.cross_entropy(net(x), y) + 0.5 * F.cross_entropy(net(out.x_adv), y)
    assert set(out.parts) == {"ce_clean", "ce_adv"}
    assert torch.allclose(out.loss, mixture)
    assert (out.x_adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(out.x_adv, x)

    on = ADR(net, eps=0.1, attack={"steps": 3}, lc=2.0, smt=0.5, gc=1.0, gsmt=0.25, conf=3.0)
    torch.manual_seed(1)
    out_on = on.defense_loss(x, y, 0)
    assert torch.equal(out_on.x_adv, out.x_adv)  # same seed, same attack
    z, logits = net.forward_with_latent(x)
    z_adv, logits_adv = net.forward_with_latent(out.x_adv)
    terms = adr_terms(z, logits, z_adv, logits_adv, y)
    expected = mixture + 2 * terms["lc"] + 0.5 * terms["smt"] + terms["gc"] + 0.25 * terms["gsmt"] + 3 * terms["conf"]
    assert torch.allclose(out_on.loss, expected)
    assert set(out_on.parts) == {"ce_clean", "ce_adv", "lc", "smt", "gc", "gsmt", "conf"}
    assert torch.equal(out_on.latent, z_adv)


def test_crafting_mode_eval_by_default_train_mode_as_the_tf_code_keeps_running_statistics(batch):
    x, y = batch
    net = LatentMLP(batchnorm=True).train()
    seen = []
    net.body[2].register_forward_hook(lambda m, i, o: seen.append(m.training))
    bn = net.body[2]
    ADR(net, eps=0.1, attack={"steps": 2}).make_adversarial(x, y)
    assert seen == [False, False] and net.training
    before = {k: v.clone() for k, v in bn.named_buffers()}
    seen.clear()
    ADR(net, eps=0.1, attack={"steps": 2}, craft_in_train_mode=True).make_adversarial(x, y)
    assert seen == [True, True]
    for name, value in bn.named_buffers():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("kwargs, message", [({"lc": -1}, "lc must be a number >= 0"),
                                             ({"global_scale": 1.5}, "global_scale must be in"),
                                             ({"attack": {"steps": 0}}, "steps must be an integer")])
def test_bad_configuration_says_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ADR(LatentMLP(), **kwargs)


def test_a_network_without_the_latent_interface_is_refused():
    with pytest.raises(ValueError, match="forward_with_latent"):
        ADR(DigitsMLP(), eps=0.1)


class KeepOutputs(pl.Callback):
    def __init__(self):
        self.outputs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)


def test_adr_trains_on_digits_logs_every_term_and_hands_the_latent_to_callbacks(digits_tensors):
    x, y, _, _ = digits_tensors
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:96], y[:96]), batch_size=32)
    model = ADR(LatentMLP(), eps=0.1, attack={"steps": 2}, gsmt=1.0, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    keep = KeepOutputs()
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1, callbacks=[keep])
    trainer.fit(model, loader)
    metrics = trainer.callback_metrics
    for name in ("loss", "ce_clean", "ce_adv", "lc", "smt", "gc", "gsmt", "conf"):
        assert torch.isfinite(metrics[f"train/{name}"]), name
    assert len(keep.outputs) == 3
    assert keep.outputs[-1]["step"].latent.shape == (32, 16) and not keep.outputs[-1]["step"].latent.requires_grad
    assert keep.outputs[-1]["step"].perturbation.abs().max() <= 0.1 + 1e-6


# ---------------------------------------------------------------- targeted BIM and MIM
@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 5)).eval()


def reference_targeted(model, x, y, eps, step, steps, targets, decay=None):
    """Targeted runs written out: sign steps on -CE toward t (momentum on the mean-|g|-normalized gradient),
    clip to the ball and [0, 1]; per example the worst run w.r.t. y: misclassified first, then larger margin."""
    best = best_key = None
    for t in targets:
        x_t, v = x.clone(), torch.zeros_like(x)
        for _ in range(steps):
            x_t.requires_grad_(True)
            (g,) = torch.autograd.grad(-F.cross_entropy(model(x_t), t, reduction="sum"), x_t)
            if decay is not None:
                v = decay * v + g / g.abs().mean(dim=(1, 2, 3), keepdim=True)
                g = v
            x_t = torch.min(torch.max(x_t.detach() + step * g.sign(), x - eps), x + eps).clamp(0, 1)
        with torch.no_grad():
            logits = model(x_t)
        other = logits.clone()
        other[torch.arange(len(y)), y] = -float("inf")
        margin = other.max(1).values - logits[torch.arange(len(y)), y]
        key = [(bool(m > 0), float(m)) for m in margin]
        if best is None:
            best, best_key = x_t.clone(), key
            continue
        for i in range(len(y)):
            if key[i] > best_key[i]:
                best[i], best_key[i] = x_t[i], key[i]
    return best


def test_multi_targeted_bim_is_deterministic_and_matches_the_reference(mlp, batch):
    x, y = batch[0][:12], batch[1][:12] % 5
    ours = bim_targeted(mlp, x, y, 0.1, step=0.02, steps=6, target="all")
    reference = reference_targeted(mlp, x, y, 0.1, 0.02, 6, [(y + k) % 5 for k in range(1, 5)])
    assert torch.allclose(ours, reference, atol=1e-6)
    assert torch.equal(ours, bim_targeted(mlp, x, y, 0.1, step=0.02, steps=6, target="all"))
    setting = AttackSetting(attack="bim_targeted", eps=0.1, steps=6, step=0.02, target="all")
    assert setting.name == "bim_targeted-6 target=all eps=0.1"
    assert torch.equal(setting.run(mlp, x, y), ours)


@pytest.mark.parametrize("target", ["all", "random"])
def test_targeted_mim_matches_the_reference_with_momentum(mlp, batch, target):
    x, y = batch[0][:12], batch[1][:12] % 5
    ours = mim_targeted(mlp, x, y, 0.1, steps=5, target=target, generator=torch.Generator().manual_seed(4))
    if target == "all":
        targets = [(y + k) % 5 for k in range(1, 5)]
    else:  # the attack's own draw: y + U{1..K-1} mod K from the generator
        targets = [(y + torch.randint(1, 5, y.shape, generator=torch.Generator().manual_seed(4))) % 5]
    reference = reference_targeted(mlp, x, y, 0.1, 0.1 / 5, 5, targets, decay=1.0)
    assert torch.allclose(ours, reference, atol=1e-6)
    # momentum matters: without it the result differs
    assert not torch.allclose(ours, reference_targeted(mlp, x, y, 0.1, 0.1 / 5, 5, targets))
    assert AttackSetting(attack="mim_targeted", eps=0.1, steps=100, target=target).resolved_step == pytest.approx(1e-3)


def test_adr_cost_benchmark_runs_and_writes_its_ratio(tmp_path):
    import importlib.util
    import json

    from cli_utils import ROOT

    spec = importlib.util.spec_from_file_location("adr_cost", ROOT / "bench" / "adr_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "adr_cost.json"
    result = module.main(["--batch-size", "4", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["ratios"] == result["ratios"] and result["ratios"]["adr_vs_pgd_at"] > 0
    assert written["latent_dim"] == 3200 and {"threads", "machine", "date"} <= set(written)


def test_the_terms_stay_float32_under_bf16_autocast():
    """A bf16-mixed trainer runs the defense under autocast: the pairwise (B, C) x (C, B) product of the global
    smoothness would run in bf16 there, although its inputs were cast to float32."""
    g = torch.Generator().manual_seed(0)
    z, z_adv = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    logits, logits_adv = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    reference = adr_terms(z, logits, z_adv, logits_adv, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = adr_terms(z, logits, z_adv, logits_adv, y)
    for name, value in reference.items():
        assert mixed[name].dtype == torch.float32 and torch.equal(mixed[name], value), name
