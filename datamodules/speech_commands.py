"""Speech Commands v0.02 (torchaudio's on-disk layout): 12-class keyword spotting on 1 s, 16 kHz waveforms."""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .base import SplitDataModule, TensorPairDataset, _check_int, check_loader_args, collate_batch
from .errors import DatasetNotFoundError, download_failed_message, guarded_download, short_reason
from .speech_files import (
    _ARCHIVE,
    _DATA_FOLDER,
    _FOLDER_IN_ROOT,
    _LIST_FILES,
    _NOISE_FOLDER,
    _VERSION_FOLDER,
    CLIP_SAMPLES,
    LABELS,
    SAMPLE_RATE,
    SILENCE,
    UNKNOWN,
    WORDS,
    SpeechFiles,
)

__all__ = ["CLIP_SAMPLES", "LABELS", "SAMPLE_RATE", "SILENCE", "UNKNOWN", "WORDS", "SpeechCommands"]

_SPLITS = ("train", "val", "test")
_URL = f"http://download.tensorflow.org/data/{_VERSION_FOLDER}.tar.gz"  # what torchaudio downloads


class SpeechCommands(SplitDataModule):
    """Google Speech Commands v0.02 as 12-class keyword spotting on raw 1 s waveforms.

    **Layout** (as ``torchaudio.datasets.SPEECHCOMMANDS`` downloads and extracts it)::

        <root>/SpeechCommands/speech_commands_v0.02/
            <word>/<speaker>_nohash_<k>.wav     35 word folders of 16 kHz mono clips (about 105k)
            validation_list.txt                 relative paths like ``yes/0a7c2a8d_nohash_0.wav``
            testing_list.txt
            _background_noise_/*.wav            six long noise recordings (16 kHz)

    torchaudio is used only to download and extract (``download=True``, in ``prepare_data``); every WAV
    is read with ``soundfile``. A file that does not read or whose sample rate is not 16000 Hz raises
    :class:`DatasetValueError` (a ``ValueError``) naming it. A failed download or extraction raises
    :class:`DatasetError` after removing what it created (the archive, the half-extracted folder).

    **Splits** are the official ones: ``val`` is every file in ``validation_list.txt``, ``test`` every
    file in ``testing_list.txt``, ``train`` every other word file (torchaudio's ``subset`` rule).

    **Labels** (12): ``yes no up down left right on off stop go`` (0..9), ``unknown`` (10): the clips of
    every other word folder (``bed``, ``bird``, ``cat``, ... but not ``_background_noise_``), and
    ``silence`` (11). ``unknown_fraction`` keeps a random fraction of each split's unknown clips (chosen
    with a seed from ``split_seed``); the default 1.0 keeps all of them, so ``unknown`` is then by far the
    largest class (about 60% of the word clips).

    **Silence** clips are 1 s windows cut from the ``_background_noise_`` recordings, uniformly over all
    windows of all recordings (a longer recording gives more clips), at random offsets drawn with a
    different seed for each split (derived from ``split_seed``), so no two splits share a draw. Each
    split gets ``silence_per_split`` clips; the default (None) gives it the mean number of clips of the
    ten word classes in that split, rounded half up, so ``silence`` is about as frequent as one command
    word. (TensorFlow's speech_commands example instead makes silence and unknown about 10% each of a
    split; ``silence_per_split`` and ``unknown_fraction`` can approximate that.)

    **Memory format**: every clip is zero-padded at the end or cut to its first 16000 samples and kept in
    memory as int16, shape (N, 1, 16000), with int64 labels (N,) -- half the memory of float32 (about
    3.4 GB for the whole dataset). Each split is stored in a seeded random order (not grouped by word),
    so its first examples are a fair sample, e.g. for an evaluation with a ``limit``. On the device,
    :meth:`preprocess` (called in ``on_after_batch_transfer``) turns a batch into float32 in [-1, 1] by
    dividing by 32768. There is no augmentation.

    **Cache**: reading 105k WAV files takes minutes, so after the first pass each split is saved as
    ``<root>/SpeechCommands/advtrain_cache_<split>_<key>.pt``. The key hashes the settings that shape the
    split (``unknown_fraction``, ``silence_per_split``, ``split_seed``) and the list of files with their
    sizes, so changing a setting or the files builds a new cache instead of reusing a wrong one. Old cache
    files are not deleted (delete them by hand when space matters). Caches are loaded with
    ``torch.load(weights_only=True, mmap=True)``: the data stays in the page cache, which processes of
    one node (DDP ranks) share. ``cache=False`` always reads the WAV files and writes nothing.

    When each hook runs:

    * ``__init__``: checks the arguments; without ``download`` a missing dataset folder raises
      :class:`DatasetNotFoundError` here, before any training starts.
    * ``prepare_data`` (once per node): downloads and extracts when ``download`` is true.
    * ``setup(stage)`` (every rank): loads ``train`` and ``val`` for ``fit``, ``val`` for ``validate``,
      ``test`` for ``test``/``predict``, all three for ``None``; splits already loaded are kept.
    * ``on_after_batch_transfer`` (on the device): :meth:`preprocess` scales int16 to float32.

    Args:
        root: folder that holds ``SpeechCommands/speech_commands_v0.02`` (and the downloaded archive).
        download: download and extract the dataset into ``root`` in ``prepare_data`` when missing.
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size per device; defaults to ``batch_size``.
        num_workers: dataloader worker processes (0: slice the in-memory tensors in the main process).
        pin_memory: pin host batches for faster, asynchronous copies to the GPU.
        unknown_fraction: fraction in [0, 1] of each split's ``unknown`` clips to keep (1.0: all).
        silence_per_split: number of ``silence`` clips in each split; None: the mean word-class count.
        split_seed: seed of the unknown subsampling, the silence offsets and the order of the examples.
        cache: save the parsed splits next to the data and reuse them on later runs.
    """

    name = "Speech Commands"
    num_classes = len(LABELS)
    #: (C, T) of one input: mono, 1 s at 16 kHz.
    input_shape = (1, CLIP_SAMPLES)
    labels = LABELS
    #: Where the files must be inside ``root`` (named in error messages).
    data_folder = _DATA_FOLDER

    collate_fn = staticmethod(collate_batch)  # the dataset's __getitems__ already returns whole batches
    input_bounds = (-1.0, 1.0)  # waveforms: every attack clamps to [-1, 1], and eps is in these units

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        unknown_fraction: float = 1.0,
        silence_per_split: int | None = None,
        split_seed: int = 0,
        cache: bool = True,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, eval_batch_size, split_seed, num_workers)
        if silence_per_split is not None:
            _check_int("silence_per_split", silence_per_split, 0, "Set data.silence_per_split to the number of "
                       "silence clips per split, or null for the mean count of the ten word classes.")
        if isinstance(unknown_fraction, bool) or not isinstance(unknown_fraction, (int, float)):
            raise TypeError(f"data.unknown_fraction must be a number in [0, 1], got {unknown_fraction!r}.")
        if not 0.0 <= unknown_fraction <= 1.0:
            raise ValueError(f"data.unknown_fraction must be in [0, 1], got {unknown_fraction}. It is the "
                             "fraction of the 'unknown' clips to keep (1.0: all).")
        self.root = os.fspath(root)
        self.download = bool(download)
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self.unknown_fraction = float(unknown_fraction)
        self.silence_per_split = silence_per_split
        self.split_seed = split_seed
        self.cache = bool(cache)
        self._files = SpeechFiles(self.root, self.name, self._not_found_message, self.unknown_fraction,
                                  self.silence_per_split, self.split_seed)
        self.data_path = self._files.data_path
        self.train_set: TensorPairDataset | None = None
        self.val_set: TensorPairDataset | None = None
        self.test_set: TensorPairDataset | None = None
        if not self.download and not os.path.isdir(self.data_path):
            raise DatasetNotFoundError(self._not_found_message(f"folder '{self.data_path}' does not exist"))

    # ------------------------------------------------------------------------------------- lightning

    def prepare_data(self) -> None:
        """Download and extract when ``download`` is true (Lightning calls this on one process per node).

        A failed download or extraction raises :class:`DatasetError` and leaves nothing behind (no partial
        archive, no half-extracted folder); files and folders that were there before are kept."""
        if not self.download:
            return
        import torchaudio.datasets

        archive = os.path.join(self.root, _ARCHIVE)
        # torchaudio extracts an archive that is already there instead of downloading it
        had_archive = os.path.isfile(archive) and not os.path.isdir(self.data_path)

        def fetch() -> None:
            os.makedirs(self.root, exist_ok=True)  # torch.hub writes the archive into root without creating it
            torchaudio.datasets.SPEECHCOMMANDS(self.root, download=True)

        def failure(err: Exception) -> str:
            if had_archive:
                return (f"extracting {self.name} from '{archive}' into '{self.data_path}' failed "
                        f"({short_reason(err)}); if the archive is truncated or corrupted, delete it and keep "
                        "data.download: true to download it again, or extract it by hand.")
            files = (f"the contents of {_ARCHIVE}: the word folders, {_NOISE_FOLDER}, {_LIST_FILES['val']} and "
                     f"{_LIST_FILES['test']}; or put {_ARCHIVE} itself in '{self.root}'")
            return download_failed_message(self.name, _URL, short_reason(err), self.data_path, files)

        owned = [_ARCHIVE, f"{_ARCHIVE}.*.partial"]
        if not os.path.isdir(self.data_path):  # else torchaudio writes nothing (and the walk could be long)
            owned.append(_FOLDER_IN_ROOT)
        guarded_download(fetch, self.root, owned, failure)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits that ``stage`` needs; splits already loaded are kept."""
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._load("train")
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._load("val")
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._load("test")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset("val"), self.eval_batch_size, shuffle=False)

    # ---------------------------------------------------------------------------------------- public

    def eval_dataset(self, split: str) -> Dataset:
        """The ``"val"``, ``"test"`` or ``"train"`` split as a :class:`TensorPairDataset` (int16 waveforms).

        Loads the split if ``setup`` has not yet done so. Batches from it still need :meth:`preprocess`
        to become float32 waveforms in [-1, 1].
        """
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}: expected 'val', 'test' or 'train'")
        attr = f"{split}_set"
        if getattr(self, attr) is None:
            setattr(self, attr, self._load(split))
        return getattr(self, attr)

    def preprocess(self, batch: tuple[Tensor, Tensor], train: bool) -> tuple[Tensor, Tensor]:
        """Turn a batch on the device into float32 waveforms in [-1, 1]: int16 is divided by 32768.

        Floating inputs keep their values. ``train`` changes nothing: there is no augmentation.
        """
        x, y = batch
        x = x.float().div_(32768) if x.dtype == torch.int16 else x.float()
        return x, y

    # --------------------------------------------------------------------------------------- helpers

    def _load(self, split: str) -> TensorPairDataset:
        """The split from its cache when that matches the settings and files, else built from the WAV files."""
        files = self._files.split_files()[split]
        noise = self._files.noise_files()
        key = self._files.cache_key(split, files, noise)
        path = self._files.cache_path(split, key)
        if self.cache and os.path.isfile(path):
            loaded = self._files.read_cache(path, key)
            if loaded is not None:
                return TensorPairDataset(*loaded)
        x, y = self._files.build(split, files, noise)
        if self.cache:
            self._files.write_cache(path, key, x, y)
        return TensorPairDataset(x, y)
