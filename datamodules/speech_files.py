"""Speech Commands v0.02 on disk (torchaudio's layout): the split lists, the word clips read with ``soundfile``,
silence clips cut from ``_background_noise_``, and the ``.pt`` cache of built splits.

:class:`advtrain.datamodules.speech_commands.SpeechCommands` describes the layout, the labels and the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import warnings
from collections.abc import Callable

import numpy as np
import soundfile
import torch
from torch import Tensor

from .errors import DatasetNotFoundError, DatasetValueError, short_reason

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
_DATA_FOLDER = f"{_FOLDER_IN_ROOT}/{_VERSION_FOLDER}"
_NOISE_FOLDER = "_background_noise_"
_HASH_DIVIDER = "_nohash_"  # torchaudio keeps only word files whose name contains it
_LIST_FILES = {"val": "validation_list.txt", "test": "testing_list.txt"}
_CACHE_FORMAT = 1  # bump when the cached tensors would come out differently for the same settings
_ARCHIVE = f"{_VERSION_FOLDER}.tar.gz"


def _seed(split_seed: int, split: str, purpose: str) -> int:
    """An independent seed for each (split_seed, split, purpose): a different stream per split."""
    digest = hashlib.sha256(f"speech_commands:{split_seed}:{split}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(split_seed: int, split: str, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(split_seed, split, purpose))


class SpeechFiles:
    """The files under ``<root>/SpeechCommands/speech_commands_v0.02`` and the splits built from them.

    ``name`` names the dataset in messages; ``not_found(problem)`` is the one-line message for a missing
    dataset (the datamodule's, which knows whether it downloads). ``unknown_fraction``,
    ``silence_per_split`` and ``split_seed`` shape each split as ``SpeechCommands`` describes.
    """

    def __init__(self, root: str, name: str, not_found: Callable[[str], str], unknown_fraction: float,
                 silence_per_split: int | None, split_seed: int) -> None:
        self.root = root
        self.name = name
        self.data_path = os.path.join(root, _FOLDER_IN_ROOT, _VERSION_FOLDER)
        self.unknown_fraction = unknown_fraction
        self.silence_per_split = silence_per_split
        self.split_seed = split_seed
        self._not_found_message = not_found
        self._index: dict[str, list[tuple[str, int]]] | None = None

    def split_files(self) -> dict[str, list[tuple[str, int]]]:
        """``{split: [(relative path, size in bytes), ...]}`` of the word clips, sorted by path."""
        if self._index is not None:
            return self._index
        if not os.path.isdir(self.data_path):
            raise DatasetNotFoundError(self._not_found_message(f"folder '{self.data_path}' does not exist"))
        if not os.listdir(self.data_path):
            raise DatasetNotFoundError(self._incomplete_message(f"folder '{self.data_path}' is empty"))
        listed: dict[str, set[str]] = {}
        for split, list_name in _LIST_FILES.items():
            list_path = os.path.join(self.data_path, list_name)
            if not os.path.isfile(list_path):
                raise DatasetNotFoundError(self._incomplete_message(f"split list '{list_path}' does not exist"))
            try:
                with open(list_path, encoding="utf-8") as f:
                    listed[split] = {posixpath.normpath(line.strip()) for line in f if line.strip()}
            except UnicodeDecodeError as err:
                raise DatasetValueError(
                    f"{self.name} split list '{list_path}' is corrupted (not UTF-8 text: {err.reason} at byte "
                    f"{err.start}); {self._refetch_hint('it')}") from None
        files: list[tuple[str, int]] = []
        with os.scandir(self.data_path) as folders:
            for folder in folders:
                if not folder.is_dir() or folder.name == _NOISE_FOLDER:
                    continue
                with os.scandir(folder.path) as entries:
                    files.extend((f"{folder.name}/{e.name}", e.stat().st_size) for e in entries
                                 if e.name.endswith(".wav") and _HASH_DIVIDER in e.name and e.is_file())
        files.sort()
        if not files:
            raise DatasetNotFoundError(self._incomplete_message(
                f"no word clips (<word>/<speaker>{_HASH_DIVIDER}<k>.wav) in '{self.data_path}'"))
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

    def noise_files(self) -> list[tuple[str, int]]:
        folder = os.path.join(self.data_path, _NOISE_FOLDER)
        if not os.path.isdir(folder):
            return []
        with os.scandir(folder) as entries:
            return sorted((e.name, e.stat().st_size) for e in entries if e.name.endswith(".wav") and e.is_file())

    # ----------------------------------------------------------------------------------------- cache

    def cache_key(self, split: str, files: list[tuple[str, int]], noise: list[tuple[str, int]]) -> str:
        settings = {
            "format": _CACHE_FORMAT, "split": split, "unknown_fraction": self.unknown_fraction,
            "silence_per_split": self.silence_per_split, "split_seed": self.split_seed,
            "clip_samples": CLIP_SAMPLES, "files": files, "noise": noise,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def cache_path(self, split: str, key: str) -> str:
        return os.path.join(self.root, _FOLDER_IN_ROOT, f"advtrain_cache_{split}_{key[:16]}.pt")

    def read_cache(self, path: str, key: str) -> tuple[Tensor, Tensor] | None:
        try:
            data = torch.load(path, weights_only=True, mmap=True)
            x, y = data["x"], data["y"]
            ok = (data["key"] == key and x.dtype == torch.int16 and x.ndim == 3
                  and tuple(x.shape[1:]) == (1, CLIP_SAMPLES) and y.dtype == torch.int64 and y.shape == x.shape[:1])
        except Exception as err:  # a truncated or foreign file: rebuild it
            warnings.warn(f"{self.name}: ignoring unreadable cache '{path}' ({err}); reading the WAV files again",
                          stacklevel=3)
            return None
        if not ok:
            warnings.warn(f"{self.name}: cache '{path}' does not match the settings; reading the WAV files again",
                          stacklevel=3)
            return None
        return x, y

    def write_cache(self, path: str, key: str, x: Tensor, y: Tensor) -> None:
        tmp = f"{path}.{os.getpid()}.tmp"  # atomic replace: concurrent ranks never see half a file
        try:
            torch.save({"key": key, "x": x, "y": y}, tmp)
            os.replace(tmp, path)
        except OSError as err:
            warnings.warn(f"{self.name}: could not write the cache '{path}' ({err}); the WAV files will be read "
                          "again next time", stacklevel=3)
            if os.path.exists(tmp):
                os.remove(tmp)

    # -------------------------------------------------------------------------------------- messages

    def _incomplete_message(self, problem: str) -> str:
        """One line for a dataset folder that exists but lacks files: torchaudio does not download into an
        existing folder, so ``data.download: true`` alone would change nothing."""
        return (f"{self.name} is incomplete: {problem}. Point data.root (--data.root) at the folder that holds the "
                f"complete '{_DATA_FOLDER}', or delete the folder '{self.data_path}' and set data.download: true "
                "(--data.download true) to download it again.")

    def _refetch_hint(self, what: str) -> str:
        """How to get a good copy of a corrupted file: torchaudio downloads only when the folder is gone."""
        return (f"replace {what} with the original from {_ARCHIVE}, or delete the folder '{self.data_path}' and "
                "set data.download: true (--data.download true) to download the dataset again.")

    # ----------------------------------------------------------------------------------------- clips

    def _read_wav(self, path: str) -> np.ndarray:
        """The int16 samples of a mono 16 kHz WAV file; :class:`DatasetValueError` (a ValueError) for a file
        that does not read, another sample rate or several channels."""
        try:
            data, rate = soundfile.read(path, dtype="int16")
        except (RuntimeError, EOFError) as err:  # soundfile.LibsndfileError: empty, truncated header, not a WAV
            reason = getattr(err, "error_string", None) or short_reason(err)
            raise DatasetValueError(f"{self.name} file '{path}' is corrupted ({reason.rstrip('.')}); "
                                    f"{self._refetch_hint('it')}") from None
        if rate != SAMPLE_RATE:
            raise DatasetValueError(
                f"{self.name}: '{path}' has a sample rate of {rate} Hz, expected {SAMPLE_RATE} Hz (every clip and "
                f"background noise recording must be 16 kHz); {self._refetch_hint('it')}")
        if data.ndim == 2:
            if data.shape[1] != 1:
                raise DatasetValueError(f"{self.name}: '{path}' has {data.shape[1]} channels, expected mono; "
                                        f"{self._refetch_hint('it')}")
            data = data[:, 0]
        return data

    def build(self, split: str, files: list[tuple[str, int]],
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
