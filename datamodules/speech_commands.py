"""Speech Commands v0.02 (torchaudio's on-disk layout): 12-class keyword spotting on 1 s, 16 kHz waveforms."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import warnings

import numpy as np
import soundfile
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .base import DatasetNotFoundError, SplitDataModule, TensorPairDataset, _check_int, check_loader_args, collate_batch

__all__ = ["LABELS", "SAMPLE_RATE", "WORDS", "SpeechCommands"]

#: The ten command words, labels 0..9 in this order.
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
#: All twelve labels: the ten words, then ``unknown`` (10) and ``silence`` (11).
LABELS = (*WORDS, "unknown", "silence")
UNKNOWN = LABELS.index("unknown")
SILENCE = LABELS.index("silence")
SAMPLE_RATE = 16000
#: Every clip is padded with zeros or cut to this many samples (1 s).
CLIP_SAMPLES = 16000

_FOLDER_IN_ROOT = "SpeechCommands"
_VERSION_FOLDER = "speech_commands_v0.02"
_NOISE_FOLDER = "_background_noise_"
_HASH_DIVIDER = "_nohash_"  # torchaudio keeps only word files whose name contains it
_LIST_FILES = {"val": "validation_list.txt", "test": "testing_list.txt"}
_SPLITS = ("train", "val", "test")
_CACHE_FORMAT = 1  # bump when the cached tensors would come out differently for the same settings


def _seed(split_seed: int, split: str, purpose: str) -> int:
    """An independent seed for each (split_seed, split, purpose): a different stream per split."""
    digest = hashlib.sha256(f"speech_commands:{split_seed}:{split}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(split_seed: int, split: str, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(split_seed, split, purpose))


class SpeechCommands(SplitDataModule):
    """Google Speech Commands v0.02 as 12-class keyword spotting on raw 1 s waveforms.

    **Layout** (as ``torchaudio.datasets.SPEECHCOMMANDS`` downloads and extracts it)::

        <root>/SpeechCommands/speech_commands_v0.02/
            <word>/<speaker>_nohash_<k>.wav     35 word folders of 16 kHz mono clips (about 105k)
            validation_list.txt                 relative paths like ``yes/0a7c2a8d_nohash_0.wav``
            testing_list.txt
            _background_noise_/*.wav            six long noise recordings (16 kHz)

    torchaudio is used only to download and extract (``download=True``, in ``prepare_data``); every WAV
    is read with ``soundfile``. A file whose sample rate is not 16000 Hz raises ``ValueError`` naming it.

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
    data_folder = f"{_FOLDER_IN_ROOT}/{_VERSION_FOLDER}"

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
        self.data_path = os.path.join(self.root, _FOLDER_IN_ROOT, _VERSION_FOLDER)
        self.train_set: TensorPairDataset | None = None
        self.val_set: TensorPairDataset | None = None
        self.test_set: TensorPairDataset | None = None
        self._index: dict[str, list[tuple[str, int]]] | None = None
        if not self.download and not os.path.isdir(self.data_path):
            raise DatasetNotFoundError(self._not_found_message(f"folder '{self.data_path}' does not exist"))

    # ------------------------------------------------------------------------------------- lightning

    def prepare_data(self) -> None:
        """Download and extract when ``download`` is true (Lightning calls this on one process per node)."""
        if self.download:
            import torchaudio.datasets

            torchaudio.datasets.SPEECHCOMMANDS(self.root, download=True)

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

    def _split_files(self) -> dict[str, list[tuple[str, int]]]:
        """``{split: [(relative path, size in bytes), ...]}`` of the word clips, sorted by path."""
        if self._index is not None:
            return self._index
        if not os.path.isdir(self.data_path):
            raise DatasetNotFoundError(self._not_found_message(f"folder '{self.data_path}' does not exist"))
        listed: dict[str, set[str]] = {}
        for split, list_name in _LIST_FILES.items():
            list_path = os.path.join(self.data_path, list_name)
            if not os.path.isfile(list_path):
                raise DatasetNotFoundError(self._not_found_message(f"split list '{list_path}' does not exist"))
            with open(list_path, encoding="utf-8") as f:
                listed[split] = {posixpath.normpath(line.strip()) for line in f if line.strip()}
        files: list[tuple[str, int]] = []
        with os.scandir(self.data_path) as folders:
            for folder in folders:
                if not folder.is_dir() or folder.name == _NOISE_FOLDER:
                    continue
                with os.scandir(folder.path) as entries:
                    files.extend((f"{folder.name}/{e.name}", e.stat().st_size) for e in entries
                                 if e.name.endswith(".wav") and _HASH_DIVIDER in e.name and e.is_file())
        files.sort()
        present = {path for path, _ in files}
        for split, paths in listed.items():
            missing = sorted(paths - present)
            if missing:
                raise DatasetNotFoundError(
                    f"{self.name} is incomplete: {len(missing)} files listed in "
                    f"'{os.path.join(self.data_path, _LIST_FILES[split])}' are missing, e.g. "
                    f"'{os.path.join(self.data_path, missing[0])}'. Download the dataset again "
                    "(data.download: true into an empty data.root).")
        self._index = {
            "train": [f for f in files if f[0] not in listed["val"] and f[0] not in listed["test"]],
            "val": [f for f in files if f[0] in listed["val"]],
            "test": [f for f in files if f[0] in listed["test"]],
        }
        return self._index

    def _noise_files(self) -> list[tuple[str, int]]:
        folder = os.path.join(self.data_path, _NOISE_FOLDER)
        if not os.path.isdir(folder):
            return []
        with os.scandir(folder) as entries:
            return sorted((e.name, e.stat().st_size) for e in entries if e.name.endswith(".wav") and e.is_file())

    def _cache_key(self, split: str, files: list[tuple[str, int]], noise: list[tuple[str, int]]) -> str:
        settings = {
            "format": _CACHE_FORMAT, "split": split, "unknown_fraction": self.unknown_fraction,
            "silence_per_split": self.silence_per_split, "split_seed": self.split_seed,
            "clip_samples": CLIP_SAMPLES, "files": files, "noise": noise,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def _cache_path(self, split: str, key: str) -> str:
        return os.path.join(self.root, _FOLDER_IN_ROOT, f"advtrain_cache_{split}_{key[:16]}.pt")

    def _load(self, split: str) -> TensorPairDataset:
        files = self._split_files()[split]
        noise = self._noise_files()
        key = self._cache_key(split, files, noise)
        path = self._cache_path(split, key)
        if self.cache and os.path.isfile(path):
            loaded = self._read_cache(path, key)
            if loaded is not None:
                return TensorPairDataset(*loaded)
        x, y = self._build(split, files, noise)
        if self.cache:
            self._write_cache(path, key, x, y)
        return TensorPairDataset(x, y)

    def _read_cache(self, path: str, key: str) -> tuple[Tensor, Tensor] | None:
        try:
            data = torch.load(path, weights_only=True, mmap=True)
            x, y = data["x"], data["y"]
            ok = (data["key"] == key and x.dtype == torch.int16 and x.ndim == 3
                  and tuple(x.shape[1:]) == self.input_shape and y.dtype == torch.int64 and y.shape == x.shape[:1])
        except Exception as err:  # a truncated or foreign file: rebuild it
            warnings.warn(f"{self.name}: ignoring unreadable cache '{path}' ({err}); reading the WAV files again",
                          stacklevel=3)
            return None
        if not ok:
            warnings.warn(f"{self.name}: cache '{path}' does not match the settings; reading the WAV files again",
                          stacklevel=3)
            return None
        return x, y

    def _write_cache(self, path: str, key: str, x: Tensor, y: Tensor) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"  # atomic replace: concurrent ranks never see half a file
        try:
            torch.save({"key": key, "x": x, "y": y}, tmp)
            os.replace(tmp, path)
        except OSError as err:
            warnings.warn(f"{self.name}: could not write the cache '{path}' ({err}); the WAV files will be read "
                          "again next time", stacklevel=3)
            if os.path.exists(tmp):
                os.remove(tmp)

    def _read_wav(self, path: str) -> np.ndarray:
        """The int16 samples of a mono 16 kHz WAV file; ValueError for another rate or several channels."""
        data, rate = soundfile.read(path, dtype="int16")
        if rate != SAMPLE_RATE:
            raise ValueError(f"{self.name}: '{path}' has a sample rate of {rate} Hz, expected {SAMPLE_RATE} Hz "
                             "(every clip and background noise recording must be 16 kHz).")
        if data.ndim == 2:
            if data.shape[1] != 1:
                raise ValueError(f"{self.name}: '{path}' has {data.shape[1]} channels, expected mono.")
            data = data[:, 0]
        return data

    def _build(self, split: str, files: list[tuple[str, int]],
               noise: list[tuple[str, int]]) -> tuple[Tensor, Tensor]:
        paths = [path for path, _ in files]
        labels = torch.tensor([WORDS.index(p.split("/")[0]) if p.split("/")[0] in WORDS else UNKNOWN
                               for p in paths], dtype=torch.int64)
        unknown = (labels == UNKNOWN).nonzero().flatten()
        n_keep = int(self.unknown_fraction * len(unknown) + 0.5)
        keep = torch.randperm(len(unknown), generator=_generator(self.split_seed, split, "unknown"))[:n_keep]
        mask = labels != UNKNOWN
        mask[unknown[keep]] = True
        index = mask.nonzero().flatten().tolist()
        n_words = int((labels < UNKNOWN).sum())
        n_silence = (n_words + 5) // 10 if self.silence_per_split is None else self.silence_per_split

        y = torch.cat([labels[index], torch.full((n_silence,), SILENCE, dtype=torch.int64)])
        # Item j (the kept word clips in path order, then the silence clips) goes to row where[j]; writing
        # each row in place avoids a second full-size copy of the split.
        order = torch.randperm(len(y), generator=_generator(self.split_seed, split, "order"))
        where = torch.empty_like(order)
        where[order] = torch.arange(len(order))
        rows = where.tolist()
        x = np.zeros((len(y), CLIP_SAMPLES), dtype=np.int16)
        for row, i in zip(rows, index):
            data = self._read_wav(os.path.join(self.data_path, paths[i]))[:CLIP_SAMPLES]
            x[row, : len(data)] = data
        if n_silence > 0:
            x[rows[len(index):]] = self._silence(split, n_silence, noise)
        return torch.from_numpy(x).unsqueeze(1), y[order]

    def _silence(self, split: str, n: int, noise: list[tuple[str, int]]) -> np.ndarray:
        """``n`` 1 s windows drawn uniformly from all windows of the background noise recordings."""
        folder = os.path.join(self.data_path, _NOISE_FOLDER)
        recordings = [self._read_wav(os.path.join(folder, name)) for name, _ in noise]
        windows = torch.tensor([max(0, len(r) - CLIP_SAMPLES + 1) for r in recordings], dtype=torch.int64)
        if int(windows.sum()) == 0:
            raise DatasetNotFoundError(self._not_found_message(
                f"no background noise recording of at least 1 s in '{folder}' to cut {n} silence clips from "
                "(or set data.silence_per_split: 0 for no silence class examples)"))
        ends = windows.cumsum(0)
        draws = torch.randint(int(ends[-1]), (n,), generator=_generator(self.split_seed, split, "silence"))
        which = torch.searchsorted(ends, draws, right=True)
        offsets = draws - (ends - windows)[which]
        return np.stack([recordings[k][o: o + CLIP_SAMPLES] for k, o in zip(which.tolist(), offsets.tolist())])
