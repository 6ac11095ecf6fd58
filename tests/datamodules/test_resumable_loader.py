"""The training loader resumes an epoch in its middle: the same order, from the next batch, without touching the
global random generator that the checkpoint restored; under DDP Lightning rebuilds it and keeps the position."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler

from advtrain.datamodules import Digits
from advtrain.datamodules.resume import ResumableLoader, ShuffleSampler


def batches(loader, epochs=1):
    return [b.tolist() for _ in range(epochs) for b in loader]


def test_shuffle_sampler_draws_and_orders_exactly_as_torchs_random_sampler():
    data = torch.arange(103)
    torch.manual_seed(5)
    expected = batches(DataLoader(data, batch_size=16, shuffle=True), epochs=2)
    state = torch.get_rng_state()
    torch.manual_seed(5)
    assert batches(ResumableLoader(data, batch_size=16, sampler=ShuffleSampler(data)), epochs=2) == expected
    assert torch.equal(torch.get_rng_state(), state)  # the same draws from the global generator


def test_a_resumed_epoch_continues_the_interrupted_one_and_then_runs_on_as_if_never_stopped():
    data = torch.arange(103)
    torch.manual_seed(5)
    sampler = ShuffleSampler(data)
    loader = ResumableLoader(data, batch_size=16, sampler=sampler)
    expected = batches(loader, epochs=3)
    end_state = torch.get_rng_state()

    torch.manual_seed(5)
    sampler = ShuffleSampler(data)
    first = iter(ResumableLoader(data, batch_size=16, sampler=sampler))
    done = [next(first).tolist() for _ in range(3)]  # interrupted after 3 of 7 batches
    saved_rng, saved_seed = torch.get_rng_state(), sampler.seed

    torch.manual_seed(123)  # a new process
    resumed = ResumableLoader(data, batch_size=16, sampler=ShuffleSampler(data, seed=saved_seed), resume_batches=3)
    torch.set_rng_state(saved_rng)  # what the checkpoint restores
    assert len(resumed) == 7  # the whole epoch, as Lightning counts it
    assert done + batches(resumed, epochs=3) == expected  # the rest of the first epoch, then two full ones
    assert torch.equal(torch.get_rng_state(), end_state)


def test_the_position_survives_lightnings_rebuild_for_ddp():
    """Lightning re-creates a DDP loader from its constructor arguments with a DistributedSampler: the position
    to resume from is one of them."""
    from lightning_fabric.utilities.data import _replace_dunder_methods
    from pytorch_lightning.utilities.data import _update_dataloader

    data = torch.arange(100)
    with _replace_dunder_methods(DataLoader, "dataset"):
        loader = ResumableLoader(data, batch_size=10, sampler=ShuffleSampler(data), resume_batches=2)
    rank1 = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=0)
    rebuilt = _update_dataloader(loader, rank1)
    assert type(rebuilt) is ResumableLoader and rebuilt.resume_batches == 2
    rank1.set_epoch(3)
    full = [b.tolist() for b in DataLoader(data, batch_size=10, sampler=rank1)]
    assert batches(rebuilt) == full[2:] and len(rebuilt) == 5


def test_the_datamodule_saves_the_position_only_in_the_middle_of_an_epoch():
    class Progress:  # what the datamodule reads of the trainer
        training, num_training_batches = True, 20

        class fit_loop:  # noqa: N801
            class epoch_loop:  # noqa: N801
                class batch_progress:  # noqa: N801
                    class current:  # noqa: N801
                        ready = 7

    digits = Digits()
    digits.trainer = Progress()
    torch.manual_seed(0)
    first = digits.train_dataloader()
    order = [y.tolist() for _, y in first][7:]
    assert digits.state_dict() == {"epoch_batches": 7, "epoch_seed": first.sampler.seed}
    resumed = Digits()
    resumed.load_state_dict(digits.state_dict())
    assert [y.tolist() for _, y in resumed.train_dataloader()] == order
    Progress.fit_loop.epoch_loop.batch_progress.current.ready = 20  # the epoch's end: nothing to resume
    assert digits.state_dict() == {}
