"""What a defense computes for a batch, and what its training step hands to the callbacks."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class DefenseOutput:
    """What :meth:`~advtrain.defenses.base.AdversarialDefense.defense_loss` returns for one training batch."""

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)  # every named term of the loss, logged as train/<name>
    logits_clean: Tensor | None = None
    logits_adv: Tensor | None = None
    x_adv: Tensor | None = None  # the step's adversarial examples, if any: callbacks get x_adv - x
    latent: Tensor | None = None  # the latent representation the loss used (ADR: z of x_adv)
    input_gradient: Tensor | None = None  # the input gradient the loss used (SGR: g, true label, train mode)


@dataclass
class StepOutput:
    """What a training step computed, for the callbacks: ``outputs["step"]`` in ``on_train_batch_end`` (Lightning
    passes ``training_step``'s dict on; the loss is ``outputs["loss"]``). Every tensor is detached; a field is None
    when the defense did not compute it, and a callback that needs it says so."""

    x: Tensor  # the clean batch as the network saw it (after preprocessing and channels_last)
    y: Tensor
    perturbation: Tensor | None = None  # x_adv - x
    latent: Tensor | None = None
    input_gradient: Tensor | None = None

    @classmethod
    def of(cls, x: Tensor, y: Tensor, out: DefenseOutput) -> StepOutput:
        def detached(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        perturbation = None if out.x_adv is None else out.x_adv - x
        return cls(x.detach(), y, detached(perturbation), detached(out.latent), detached(out.input_gradient))


def step_output(outputs) -> StepOutput | None:
    """The :class:`StepOutput` in a callback's ``outputs`` (None for a module that is not an advtrain defense)."""
    return outputs.get("step") if isinstance(outputs, dict) else None
