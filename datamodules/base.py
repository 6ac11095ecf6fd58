"""In-memory image datamodules with batched augmentation on the device.

Small datasets (digits, MNIST, CIFAR-10) fit in memory as uint8 tensors, so the dataloader only slices
tensors (one ``__getitems__`` call per batch, no per-example Python) and the model's device does the
scaling, random crop and flip in ``on_after_batch_transfer``. The GPU never waits for Python workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .augment import random_crop_flip, to_unit_float
from .errors import DatasetError, DatasetNotFoundError, DatasetValueError, guarded_download
from .resume import ResumableTraining
from .splits import check_val_split, holdout

__all__ = ["ArrayDataModule", "DatasetError", "DatasetNotFoundError", "DatasetValueError", "SplitDataModule",
           "TensorPairDataset", "collate_batch", "guarded_download", "to_unit_float"]


class TensorPairDataset(Dataset):
    """A dataset over in-memory tensors ``x`` (N, ...) and ``y`` (N,).

    ``__getitems__`` returns a whole batch ``(x[indices], y[indices])`` with one indexing op; torch's
    DataLoader calls it instead of ``__getitem__`` per example. Pair it with :func:`collate_batch`.
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]


def collate_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate function for :class:`TensorPairDataset`: the batch is already stacked, pass it through."""
    return batch


def _check_int(name: str, value: object, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"data.{name} must be an integer, got {value!r} ({type(value).__name__}). {hint}")
    if value < minimum:
        raise ValueError(f"data.{name} must be >= {minimum}, got {value}. {hint}")


def check_loader_args(batch_size: object, eval_batch_size: object, split_seed: object, num_workers: object) -> None:
    """The loader arguments every datamodule takes, checked with a hint that names the config key."""
    _check_int("batch_size", batch_size, 1, "Set data.batch_size (--data.batch_size) to a positive number.")
    if eval_batch_size is not None:
        _check_int("eval_batch_size", eval_batch_size, 1,
                   "Set data.eval_batch_size to a positive number, or null to use batch_size.")
    _check_int("split_seed", split_seed, 0, "Set data.split_seed to a non-negative integer.")
    _check_int("num_workers", num_workers, 0, "Set data.num_workers to 0 or more worker processes.")


class SplitDataModule(ResumableTraining, pl.LightningDataModule):
    """What every advtrain datamodule shares: the loaders over ``train_set`` and ``eval_dataset(split)``,
    ``preprocess`` on the device after each transfer, and a training loader that resumes in the middle of an epoch
    (:class:`~advtrain.datamodules.resume.ResumableTraining`). Subclasses set ``train_set``, ``batch_size``,
    ``eval_batch_size``, ``num_workers``, ``pin_memory`` and ``collate_fn`` and define ``setup``,
    ``eval_dataset``, ``val_dataloader`` and ``preprocess``."""

    collate_fn = None  # None: torch's default collate of single examples
    input_bounds = (0.0, 1.0)  # the natural input range: attacks clamp to it (audio: (-1, 1))

    def _not_found_message(self, problem: str) -> str:
        """One line for a missing dataset: what is missing and the two ways to fix it."""
        if self.download:
            fix = ("data.download is true but the files are not there yet: call prepare_data() before "
                   "setup() (the Trainer does this), or check that the download succeeded.")
        else:
            fix = (f"Point data.root (--data.root) at the folder that holds '{self.data_folder}', or set "
                   "data.download: true (--data.download true) to download it.")
        return f"{self.name} not found: {problem}. {fix}"

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        # a RandomSampler: under DDP Lightning replaces it by a shuffling DistributedSampler
        return self.training_loader(self.train_set, self.batch_size, **self._loader_options())

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset("test"), self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        return self.preprocess(batch, train=self.trainer is not None and self.trainer.training)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **self._loader_options())

    def _loader_options(self) -> dict:
        return dict(drop_last=False, collate_fn=self.collate_fn, num_workers=self.num_workers,
                    pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)


class ArrayDataModule(SplitDataModule):
    """Base for image datasets kept in memory as uint8 tensors (N, C, H, W) with int64 labels.

    Subclasses set ``name``, ``num_classes``, ``input_shape`` and ``data_folder`` and implement
    :meth:`load_split` (and :meth:`download_dataset` when they can download).

    When each hook runs:

    * ``__init__``: checks the arguments; without ``download`` a missing ``root`` folder raises
      :class:`DatasetNotFoundError` here, before any training starts.
    * ``prepare_data`` (once per node, rank 0): downloads when ``download`` is true.
    * ``setup(stage)`` (every rank): loads the training split for ``fit``/``validate`` and holds out
      ``val_size`` examples as the validation split, chosen as ``val_split`` says (the same on every rank);
      loads the test split for ``test``/``predict``; ``None`` loads both.
    * ``on_after_batch_transfer`` (on the device): :meth:`preprocess` scales to [0, 1] and, while the
      trainer is training, applies random crop and flip as batched tensor ops.

    Every problem with the files raises a :class:`DatasetError` whose message is one line naming the path,
    what is wrong and what to do: :class:`DatasetNotFoundError` for missing files (or files failing their
    checksum), :class:`DatasetValueError` for files that are there but do not read (empty, truncated,
    another format), a plain :class:`DatasetError` for a failed download, which first removes every file
    and folder it created (never one that was there before).

    ``val_size=0`` means no validation: ``val_dataloader`` returns an empty list, which Lightning 2.6
    treats as zero validation batches and skips the validation loop (and the sanity check); its warning
    "Total length of `list` across ranks is zero" is expected then.

    Args:
        root: folder that holds the dataset files (see ``data_folder``).
        download: download the files into ``root`` in ``prepare_data`` when missing.
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size per device; defaults to ``batch_size``.
        val_size: number of training examples held out for validation (0: no validation).
        val_split: ``random`` (a permutation seeded with ``split_seed``) or ``first_per_class`` (the first
            ``val_size / num_classes`` examples of each class, as the official NuAT scripts hold out).
        split_seed: seed of the train/validation permutation.
        num_workers: dataloader worker processes (0: load in the main process; slicing in-memory
            tensors is cheap, so workers rarely help).
        pin_memory: pin host batches for faster, asynchronous copies to the GPU.
        crop_padding: training augmentation: zero-pad by this many pixels and crop back at a random
            offset (0: off).
        flip: training augmentation: random horizontal flip with probability 1/2.
    """

    #: Human-readable dataset name, used in messages.
    name: str = "dataset"
    num_classes: int = 0
    #: (C, H, W) of one input.
    input_shape: tuple[int, int, int] = (0, 0, 0)
    #: What must exist inside ``root`` (named in error messages); None when no files are needed.
    data_folder: str | None = None

    collate_fn = staticmethod(collate_batch)  # the dataset's __getitems__ already returns whole batches

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 1000,
        split_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        val_split: str = "random",
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, eval_batch_size, split_seed, num_workers)
        _check_int("val_size", val_size, 0,
                   "Set data.val_size to the number of training examples to hold out (0: no validation).")
        _check_int("crop_padding", crop_padding, 0,
                   "Set data.crop_padding to the padding in pixels of the random crop (0: no crop).")
        self.root = os.fspath(root)
        self.download = bool(download)
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.val_size = val_size
        self.val_split = check_val_split(val_split, val_size, self.num_classes)
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self.crop_padding = crop_padding
        self.flip = bool(flip)
        self.train_set: TensorPairDataset | None = None
        self.val_set: TensorPairDataset | None = None
        self.test_set: TensorPairDataset | None = None
        if self.data_folder is not None and not self.download and not os.path.isdir(self.root):
            raise DatasetNotFoundError(self._not_found_message(f"folder '{self.root}' does not exist"))

    # ----------------------------------------------------------------------------------------- hooks

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        """Return the training (``train=True``) or test split: uint8 (N, C, H, W) and int64 (N,)."""
        raise NotImplementedError

    def download_dataset(self) -> None:
        """Download the files into ``root`` (called by ``prepare_data`` when ``download`` is true)."""

    # ------------------------------------------------------------------------------------- lightning

    def prepare_data(self) -> None:
        """Download when ``download`` is true (Lightning calls this on one process per node)."""
        if self.download:
            self.download_dataset()

    def setup(self, stage: str | None = None) -> None:
        """Load the splits that ``stage`` needs; splits already loaded are kept."""
        if stage in (None, "fit", "validate") and self.train_set is None:
            x, y = self._load_checked(train=True)
            if self.val_size >= len(y):
                raise DatasetValueError(
                    f"data.val_size={self.val_size} must be smaller than the {len(y)} training examples of "
                    f"{self.name}; lower data.val_size (--data.val_size)."
                )
            train_idx, val_idx = holdout(y, self.val_size, self.val_split, self.split_seed, self.num_classes, self.name)
            self.train_set = TensorPairDataset(x[train_idx], y[train_idx])
            self.val_set = TensorPairDataset(x[val_idx], y[val_idx])
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = TensorPairDataset(*self._load_checked(train=False))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_size == 0:
            return []  # Lightning 2.6 runs zero validation batches for an empty list
        return self._loader(self.eval_dataset("val"), self.eval_batch_size, shuffle=False)

    # ---------------------------------------------------------------------------------------- public

    def eval_dataset(self, split: str) -> Dataset:
        """The held-out ``"val"`` or ``"test"`` split as a :class:`TensorPairDataset` (uint8 images).

        Loads the split if ``setup`` has not yet done so. Batches from it still need :meth:`preprocess`
        (``train=False``) to become float images in [0, 1].
        """
        if split == "val":
            if self.val_size == 0:
                raise ValueError(f"{self.name} has no validation split because data.val_size is 0; "
                                 "set data.val_size > 0 or evaluate on split 'test'.")
            if self.val_set is None:
                self.setup("validate")
            return self.val_set
        if split == "test":
            if self.test_set is None:
                self.setup("test")
            return self.test_set
        raise ValueError(f"unknown split {split!r}: expected 'val' or 'test'")

    def preprocess(self, batch: tuple[Tensor, Tensor], train: bool) -> tuple[Tensor, Tensor]:
        """Turn a batch on the device into float32 images in [0, 1], augmented when ``train``.

        uint8 images are divided by 255; floating images keep their values. With ``train`` each example
        gets its own random crop offset (after zero padding by ``crop_padding``) and horizontal flip (if
        ``flip``), drawn from the global RNG of the batch's device; both are gathers over the whole batch,
        with no Python loop over examples and no host-device synchronization.
        """
        x, y = batch
        if train and (self.crop_padding > 0 or self.flip):
            x = random_crop_flip(x, self.crop_padding, self.flip)
        return to_unit_float(x), y

    # --------------------------------------------------------------------------------------- helpers

    def _load_checked(self, train: bool) -> tuple[Tensor, Tensor]:
        x, y = self.load_split(train)
        split = "training" if train else "test"
        where = os.path.join(self.root, self.data_folder or "")
        fix = "point data.root at the real dataset, or delete the files and set data.download: true."
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            expected = ", ".join(map(str, self.input_shape))
            raise DatasetValueError(f"{self.name} {split} files in '{where}' hold {x.dtype} images of shape "
                                    f"{tuple(x.shape)}, expected uint8 (N, {expected}): {fix}")
        if self.num_classes > 0 and len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise DatasetValueError(f"{self.name} {split} labels in '{where}' run from {int(y.min())} to "
                                    f"{int(y.max())}, expected 0..{self.num_classes - 1}: {fix}")
        return x, y.long()
