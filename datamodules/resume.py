"""A training loader whose epoch can resume in the middle, exactly where an interrupted run stopped.

A preempted cluster job saves its state between two training steps (``advtrain.callbacks.Requeue``), usually in the
middle
of an epoch. To continue bitwise, the resumed epoch must see the same shuffled order and start at the next batch,
and building it must not consume the global random generator, whose state the checkpoint restored.

* :class:`ShuffleSampler` is torch's ``RandomSampler`` (same order, same single draw from the global generator per
  epoch) that remembers the epoch's seed, and replays a given seed instead of drawing one.
* :class:`ResumableLoader` skips the first ``resume_batches`` batches of its next epoch as lists of indices (no
  data is loaded for them). Under DDP Lightning rebuilds it around a ``DistributedSampler`` (deterministic per
  epoch) and keeps ``resume_batches``, which it saw as a constructor argument.

The position itself (batches the training loop consumed, and the seed) is the datamodule's checkpoint state
(``SplitDataModule.state_dict``): the loader cannot know it, because Lightning fetches one batch ahead and worker
processes several more.

Exactness holds for datasets whose augmentation draws from the global generators on the device (digits, MNIST,
CIFAR-10, Speech Commands). A dataset whose worker processes draw per example (ImageNet-100's resized crops) gets
the same batches in the same order after a resume, but other crops for the rest of that epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, RandomSampler


class ShuffleSampler(RandomSampler):
    """``RandomSampler(data_source)`` that records each epoch's seed in ``seed``; given ``seed``, its first epoch
    replays that order without drawing from the global generator."""

    def __init__(self, data_source, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = seed
        self._replay = seed is not None

    def __iter__(self) -> Iterator[int]:
        if self._replay:
            self._replay = False
        else:  # exactly RandomSampler's draw, so uninterrupted runs keep their order
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class _SkipFirst:
    """The loader's batch sampler, skipping the loader's pending ``resume_batches`` once."""

    def __init__(self, batches, loader: ResumableLoader) -> None:
        self.batches, self.loader = batches, loader

    def __len__(self) -> int:
        return len(self.batches)  # the whole epoch: Lightning counts the resumed position itself

    def __iter__(self):
        skip, self.loader.resume_batches = self.loader.resume_batches, 0
        batches = iter(self.batches)
        for _ in range(skip):
            next(batches, None)
        yield from batches


class ResumableLoader(DataLoader):
    """``DataLoader`` whose next epoch starts after its first ``resume_batches`` batches."""

    def __init__(self, dataset, *, resume_batches: int = 0, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.resume_batches = resume_batches

    @property
    def _index_sampler(self):
        return _SkipFirst(super()._index_sampler, self)

    def __iter__(self):
        if self.resume_batches:
            # creating an iterator draws a worker base seed from the global generator; the interrupted run drew it
            # before the checkpoint, so the resumed one must not draw it again
            with torch.random.fork_rng(devices=[]):
                return super().__iter__()
        return super().__iter__()


# Lightning warns on every mid-epoch resume with a loader that is not `_Stateful`; this one resumes exactly.
_NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


class ResumableTraining:
    """Datamodule mix-in: the training loader's position in its epoch is part of the checkpoint.

    ``state_dict`` (called when Lightning writes a checkpoint) holds the batches the training loop has consumed in
    the running epoch and the epoch's shuffle seed; ``load_state_dict`` (called when a run resumes, before the
    loaders are built) makes the next :meth:`training_loader` continue from there. A checkpoint written at an
    epoch's end holds nothing: the next epoch starts as usual.
    """

    _resume_position: dict | None = None
    _train_sampler: ShuffleSampler | None = None

    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training:
            return {}
        consumed = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if consumed == 0 or consumed >= trainer.num_training_batches:
            return {}
        seed = None if self._train_sampler is None else self._train_sampler.seed
        return {"epoch_batches": int(consumed), "epoch_seed": seed}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("epoch_batches"):
            import warnings

            warnings.filterwarnings("ignore", message=_NOT_RESUMABLE_WARNING)
            self._resume_position = dict(state_dict)

    def training_loader(self, dataset, batch_size: int, **kwargs) -> ResumableLoader:
        """The shuffled training loader; after a mid-epoch resume its first epoch continues the interrupted one."""
        position, self._resume_position = self._resume_position or {}, None
        self._train_sampler = ShuffleSampler(dataset, seed=position.get("epoch_seed"))
        return ResumableLoader(dataset, batch_size=batch_size, sampler=self._train_sampler,
                               resume_batches=position.get("epoch_batches", 0), **kwargs)
