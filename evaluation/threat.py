"""Threat models: how the attacker crafts examples, and what the evaluation must know about the network.

A setting's threat model is applied here, never inside an attack: BatchNorm and dropout in eval mode
(:func:`advtrain.attacks.attack_mode`), the network's randomness off for the omniscient attacker (Tucker theta = 1),
and attack-time surrogates of non-differentiable modules (BPDA: ``surrogate: <name>`` or ``bpda: true``,
:mod:`advtrain.attacks.surrogates`). The examples are then evaluated on the network as it is.
"""

from __future__ import annotations

import copy
import hashlib
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from advtrain.attacks import AttackSetting, attack_mode
from advtrain.attacks.surrogates import use_bpda, use_surrogate
from advtrain.networks.randomness import randomness_off


def craft(setting: AttackSetting, source: nn.Module, x: Tensor, y: Tensor,
          generator: torch.Generator | None = None, bounds: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Adversarial examples for one batch under ``setting``'s threat model: BatchNorm and dropout in eval
    mode, the network's randomness off for an omniscient attacker (Tucker theta = 1), and the chosen
    surrogate (or each module's BPDA) for non-differentiable modules."""
    with ExitStack() as stack:
        stack.enter_context(attack_mode(source))
        if setting.omniscient:
            stack.enter_context(randomness_off(source))
        if setting.surrogate is not None:
            stack.enter_context(use_surrogate(source, setting.surrogate))
        if setting.bpda:
            stack.enter_context(use_bpda(source))
        return setting.run(source, x, y, generator=generator, bounds=bounds)


def check_threat_model(setting: AttackSetting, network: nn.Module) -> None:
    """Fail before any attack runs when the network cannot honour a setting's surrogate or BPDA."""
    if setting.surrogate is not None:
        with use_surrogate(network, setting.surrogate):
            pass
    if setting.bpda:
        with use_bpda(network):
            pass


def with_version(setting: AttackSetting, randomized: bool) -> AttackSetting:
    """The version of an attack with a ``rand`` variant (AutoAttack) when the config leaves it open: ``rand``
    for a randomized network, the default (``standard``) otherwise."""
    variants = setting.spec.variants
    if setting.version is None and "rand" in variants:
        return replace(setting, version="rand" if randomized else variants[0])
    return setting


def model_hash(network: nn.Module) -> str:
    """A short fingerprint of the weights and buffers that were evaluated."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_network(template: nn.Module, checkpoint: str | Path) -> nn.Module:
    """A copy of ``template`` with the network weights of a Lightning checkpoint (for an EMA run, the
    averaged weights), in eval mode."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    weights = {k[len("network."):]: v for k, v in state.items() if k.startswith("network.")}
    network = copy.deepcopy(template)
    network.load_state_dict(weights)
    return network.eval()
