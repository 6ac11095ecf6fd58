"""ADR: adversarial training with local and global compactness of the latent space (Bui et al., ECCV 2020).

The loss follows the authors' official TensorFlow code (``train_compact.py``, ``compact_loss.py`` of
tuananhbui89/Adversarial-Divergence-Reduction; docs/methods.md "ADR"), not their PyTorch port (whose ADR
attack is never called). With z = g(x) the network's latent representation (``forward_with_latent``), x_a
the PGD example and sg a stop-gradient::

    L = 0.5 CE(f(x), y) + 0.5 CE(f(x_a), y)
      + lc   * mean_i  mean_k |sg(z_i)_k - z_a,ik|                  local compactness   (part lc)
      + smt  * mean_i  CE(softmax(sg f(x_i)), f(x_a,i))             local smoothness    (part smt)
      + gc   * mean_ij w_ij mean_k |sg(z_j)_k - z_a,ik|             global compactness  (part gc)
      + gsmt * mean_ij w_ij CE(softmax(sg f(x_j)), f(x_a,i))        global smoothness   (part gsmt)
      + conf * mean_i  H(softmax(f(x_a,i)))                         confidence          (part conf)

The (i, j) means run over all B x B pairs (clean j, adversarial i), the diagonal included. The pair weights
are ``label_weight`` of the TF code, d_ij = |onehot(y_i) - onehot(y_j)|_1 / max(d), w_ij = (scale - d_ij) /
scale: 1 for same-class pairs, 1 - 1/scale = -1/99 for different-class pairs. When every label of a batch is
equal the TF code divides 0 by 0; here w = 1 (its limit: no different-class pair exists), with no branch.

The confidence term has no stop-gradient: TF's ``softmax_cross_entropy_with_logits_v2(labels=softmax(f),
logits=f)`` backpropagates into its labels too, so the gradient is that of the entropy itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advtrain.attacks import AttackSetting, attack_mode

from .base import AdversarialDefense
from .outputs import DefenseOutput

TERMS = ("lc", "smt", "gc", "gsmt", "conf")
_CHUNK_ELEMENTS = 1 << 22  # the largest (rows, B, dim) block the chunked backward builds: 16 MB in float32


def pair_weights(y_adv: Tensor, y_clean: Tensor, scale: float = 0.99) -> Tensor:
    """w[i, j] = 1 if y_adv[i] == y_clean[j] else 1 - 1/scale (TF ``label_weight``; all-equal batch: 1)."""
    different = (y_adv[:, None] != y_clean[None, :]).float()  # d / max(d) whenever max(d) > 0
    return (scale - different) / scale


class _MeanL1Distance(torch.autograd.Function):
    """D[i, j] = mean_k |a_ik - b_jk| without a (B, B, dim) tensor; the gradient goes to ``a`` only (b is sg(z)).

    Forward: ``torch.cdist(p=1)``, a kernel that loops over pairs. Backward: on the CPU ATen's
    ``_cdist_backward`` (also a pair loop, O(B dim) memory: tests/defenses/test_adr.py measures it); elsewhere in row
    chunks of at most ``_CHUNK_ELEMENTS`` elements, because the CUDA kernel of ``_cdist_backward`` allocates
    a (B, B, dim) buffer (210 MB at B = 128 with the CIFAR CNN's 3200-d z).
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        distance = torch.cdist(a, b, p=1)
        ctx.save_for_backward(a, b, distance)
        return distance / a.shape[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b, distance = ctx.saved_tensors
        grad = (grad / a.shape[1]).contiguous()
        if a.device.type == "cpu":
            return torch.ops.aten._cdist_backward(grad, a, b, 1.0, distance), None
        return chunked_l1_gradient(grad, a, b), None


def chunked_l1_gradient(grad: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """d/da of sum_ij grad_ij sum_k |a_ik - b_jk|, i.e. sum_j grad_ij sign(a_i - b_j), built in blocks of at most
    ``_CHUNK_ELEMENTS`` (rows, B, dim) elements."""
    grad_a = torch.empty_like(a)
    rows = max(1, _CHUNK_ELEMENTS // (b.shape[0] * b.shape[1]))
    for start in range(0, a.shape[0], rows):  # a Python loop over shapes, not tensor values
        signs = torch.sign(a[start:start + rows, None, :] - b[None, :, :])
        grad_a[start:start + rows] = torch.einsum("ij,ijk->ik", grad[start:start + rows], signs)
    return grad_a


def mean_l1_distances(z_adv: Tensor, z_clean: Tensor) -> Tensor:
    """(B, B) matrix of mean_k |sg(z_clean[j]) - z_adv[i]|, differentiable in z_adv only."""
    return _MeanL1Distance.apply(z_adv, z_clean.detach())


def soft_cross_entropy(target_logits: Tensor, logits: Tensor) -> Tensor:
    """Per example -sum_c softmax(target)_c log_softmax(logits)_c (TF ``softmax_cross_entropy_with_two_logits``)."""
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1)


def adr_terms(z: Tensor, logits: Tensor, z_adv: Tensor, logits_adv: Tensor, y: Tensor,
              terms: tuple[str, ...] = TERMS, scale: float = 0.99) -> dict[str, Tensor]:
    """The five ADR terms named in ``terms`` (each unweighted), stop-gradients as in the TF code. In float32, also
    under a bf16-mixed trainer's autocast (which would run the pairwise product of the global smoothness in bf16)."""
    with torch.autocast(z.device.type, enabled=False):
        return _adr_terms(z.float(), logits.float(), z_adv.float(), logits_adv.float(), y, terms, scale)


def _adr_terms(z: Tensor, logits: Tensor, z_adv: Tensor, logits_adv: Tensor, y: Tensor, terms: tuple[str, ...],
               scale: float) -> dict[str, Tensor]:
    out = {}
    if "lc" in terms:
        out["lc"] = (z.detach() - z_adv).abs().mean()
    if "smt" in terms:
        out["smt"] = soft_cross_entropy(logits.detach(), logits_adv).mean()
    if "gc" in terms or "gsmt" in terms:
        weights = pair_weights(y, y, scale)
        if "gc" in terms:
            out["gc"] = (weights * mean_l1_distances(z_adv, z)).mean()
        if "gsmt" in terms:
            # CE(softmax(sg f(x_j)), f(x_a,i)) for all pairs is one (B, C) x (C, B) product
            pairwise = -F.log_softmax(logits_adv, dim=1) @ F.softmax(logits.detach(), dim=1).T
            out["gsmt"] = (weights * pairwise).mean()
    if "conf" in terms:
        out["conf"] = soft_cross_entropy(logits_adv, logits_adv).mean()  # entropy, no stop-gradient
    return out


class _FrozenBatchNormStatistics:
    """Leaves every BatchNorm's running statistics as they were (train-mode crafting uses batch statistics; TF's
    attack does not run the moving-average update ops)."""

    def __init__(self, network: nn.Module):
        self.norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in self.norms]

    def __exit__(self, *exc):
        with torch.no_grad():
            for module, buffers in zip(self.norms, self.saved):
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)


class ADR(AdversarialDefense):
    """ADR (Bui et al. 2020): 0.5/0.5 clean/adversarial CE plus local and global latent compactness, smoothness
    and confidence terms (module docstring).

    Args:
        lc, smt, gc, gsmt, conf: weights of the five terms; 0 switches a term off (it is then neither computed
            nor logged). Defaults: supplementary Table 1's CIFAR-10 CNN setting (all 1) except gsmt = 0, which
            the supplementary uses everywhere (the TF CIFAR run script sets 1).
        global_scale: ``scale`` of the pair weights (TF default 0.99: different-class weight -1/99).
        attack: the training attack, a setting of the attack table: ``{attack: pgd, steps: 10}`` (the default, the
            paper's: CE with the true label, uniform start, sign steps of 2.5 eps / steps by default, projection).
        craft_in_train_mode: False (our standard, the default): craft in eval mode (BatchNorm running statistics,
            no dropout). True follows the TF code: the network stays in train mode while crafting (batch
            statistics; dropout active), with BatchNorm's running statistics left untouched.
        **kwargs: the base class's arguments (network, optimizer, lr_scheduler, eps, validation).

    The network must have ``forward_with_latent(x) -> (z, logits)`` (z at its ``latent_layer``, flattened).
    Clean and adversarial batches go through separate forward passes in train mode, as in the TF code (each
    batch has its own BatchNorm statistics). ``latent=z_adv`` reaches the callbacks.
    """

    def __init__(self, *args, lc: float = 1.0, smt: float = 1.0, gc: float = 1.0, gsmt: float = 0.0,
                 conf: float = 1.0, global_scale: float = 0.99, attack: dict | str | None = None,
                 craft_in_train_mode: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights = {"lc": lc, "smt": smt, "gc": gc, "gsmt": gsmt, "conf": conf}
        for name, value in self.weights.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"ADR {name} must be a number >= 0 (0 switches the term off), got {value!r}")
        if not isinstance(global_scale, (int, float)) or not 0.0 < global_scale < 1.0:
            raise ValueError(f"ADR global_scale must be in (0, 1) (TF default 0.99), got {global_scale!r}")
        if not hasattr(self.network, "forward_with_latent"):
            raise ValueError(f"ADR needs a network with forward_with_latent(x) -> (z, logits); "
                             f"{type(self.network).__name__} has none")
        self.global_scale = float(global_scale)
        self.attack = AttackSetting.from_config(attack, self.eps, "ADR attack", default={"attack": "pgd", "steps": 10}
                                                ).check_training((), "ADR")
        self.craft_in_train_mode = craft_in_train_mode

    @property
    def active_terms(self) -> tuple[str, ...]:
        return tuple(name for name in TERMS if self.weights[name] != 0)

    def make_adversarial(self, x: Tensor, y: Tensor) -> Tensor:
        mode = _FrozenBatchNormStatistics(self.network) if self.craft_in_train_mode else attack_mode(self.network)
        with mode:
            return self.attack.run(self.network, x, y, bounds=self.input_bounds)

    def defense_loss(self, x: Tensor, y: Tensor, batch_idx: int) -> DefenseOutput:
        x_adv = self.make_adversarial(x, y)
        z, logits = self.network.forward_with_latent(x)
        z_adv, logits_adv = self.network.forward_with_latent(x_adv)
        ce_clean = F.cross_entropy(logits.float(), y)
        ce_adv = F.cross_entropy(logits_adv.float(), y)
        parts = {"ce_clean": ce_clean, "ce_adv": ce_adv}
        loss = 0.5 * ce_clean + 0.5 * ce_adv
        for name, value in adr_terms(z, logits, z_adv, logits_adv, y, self.active_terms, self.global_scale).items():
            parts[name] = value
            loss = loss + self.weights[name] * value
        return DefenseOutput(loss, parts, logits_clean=logits, logits_adv=logits_adv, x_adv=x_adv,
                             latent=z_adv)
