"""CIFAR-10 through torchvision's reader (python pickle batches in ``root/cifar-10-batches-py``)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
import torchvision
from torch import Tensor
from torchvision.datasets.utils import calculate_md5

from .base import ArrayDataModule
from .errors import DatasetNotFoundError, DatasetValueError, download_failed_message, guarded_download, short_reason

__all__ = ["CIFAR10"]

# The reader's class, for its file names and md5 sums: ``torchvision.datasets.CIFAR10`` is looked up at call time
# (tests replace it), its attributes through this name.
_TV_CIFAR10 = torchvision.datasets.CIFAR10


def pickle_problem(path: str, meta_key: str | None = None) -> str | None:
    """What is wrong with the CIFAR pickle ``path`` (a batch, or the meta file when ``meta_key`` names its
    list of class names), or None when it reads and has the expected entries."""
    if os.path.getsize(path) == 0:
        return "the file is empty"
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as err:  # EOFError, UnpicklingError, ValueError, ...: a truncated or foreign file
        return f"not a readable pickle: {short_reason(err)}"
    if not isinstance(entry, dict):
        return f"a pickled {type(entry).__name__}, expected a dict"
    if meta_key is not None:
        return None if isinstance(entry.get(meta_key), list) else f"no '{meta_key}' list"
    data, labels = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        return f"'data' is {what}, expected uint8 (N, 3072)"
    if not isinstance(labels, list) or len(labels) != len(data):
        return f"{len(data)} images but {len(labels) if isinstance(labels, list) else 'no'} labels"
    return None


class CIFAR10(ArrayDataModule):
    """CIFAR-10: 50000 training and 10000 test colour images, (3, 32, 32), 10 classes.

    Files are read (and, with ``download``, fetched) by ``torchvision.datasets.CIFAR10``, which checks
    their md5 sums. Defaults follow the usual adversarial-training recipe: random crop with 4 pixels of
    zero padding and horizontal flip, 1000 training images held out for validation, batch size 128.
    """

    name = "CIFAR-10"
    num_classes = 10
    input_shape = (3, 32, 32)
    data_folder = "cifar-10-batches-py"

    def __init__(self, crop_padding: int = 4, flip: bool = True, **kwargs) -> None:
        """The arguments of :class:`ArrayDataModule`, with CIFAR's augmentation on by default."""
        super().__init__(crop_padding=crop_padding, flip=flip, **kwargs)

    def download_dataset(self) -> None:
        """Download and extract with torchvision; a failed download raises :class:`DatasetError` and leaves
        nothing behind (no partial archive or batch folder); files that were there before are kept."""
        cls = _TV_CIFAR10
        folder = os.path.join(self.root, self.data_folder)
        archive = os.path.join(self.root, cls.filename)
        had_archive = os.path.isfile(archive)

        def fetch() -> None:
            try:
                torchvision.datasets.CIFAR10(self.root, train=True, download=True)
            except Exception as err:
                if not self._batches_intact():
                    raise  # the download or extraction failed: guarded_download cleans up
                raise self._read_error(err, train=True) from None  # all batches there, but unreadable

        def failure(err: Exception) -> str:
            if had_archive and os.path.isfile(archive) and calculate_md5(archive) == cls.tgz_md5:
                # torchvision extracts an archive with the right md5 instead of downloading it
                return (f"extracting {self.name} from '{archive}' into '{folder}' failed ({short_reason(err)}); "
                        f"extract it by hand, or delete it and keep data.download: true to download it again.")
            files = (f"{', '.join(self._file_names())}, as extracted from {cls.filename}; or put {cls.filename} "
                     f"itself in '{self.root}' and keep data.download: true")
            return download_failed_message(self.name, cls.url, short_reason(err), folder, files)

        guarded_download(fetch, self.root, [self.data_folder, cls.filename], failure)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        try:
            ds = torchvision.datasets.CIFAR10(self.root, train=train, download=False)
        except Exception as err:
            raise self._read_error(err, train) from None
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return x, torch.as_tensor(ds.targets, dtype=torch.int64)

    # --------------------------------------------------------------------------------------- helpers

    @staticmethod
    def _checksums() -> list[tuple[str, str]]:
        """(file name, md5) of every file torchvision checks, batches first, then the meta file."""
        cls = _TV_CIFAR10
        return [*((name, md5) for name, md5 in cls.train_list + cls.test_list), (cls.meta["filename"], cls.meta["md5"])]

    def _file_names(self) -> list[str]:
        return [name for name, _ in self._checksums()]

    def _batches_intact(self) -> bool:
        """Whether every data batch is there with its md5, as torchvision's download step checks: then the
        download had nothing to do or succeeded, and a failure is one of reading the files."""
        cls = _TV_CIFAR10
        folder = os.path.join(self.root, self.data_folder)
        return all(os.path.isfile(os.path.join(folder, name)) and calculate_md5(os.path.join(folder, name)) == md5
                   for name, md5 in cls.train_list + cls.test_list)

    def _read_error(self, err: Exception, train: bool) -> Exception:
        """The one-line error for torchvision failing to read a split: missing files, a file failing its md5
        sum, or a pickle that does not read; ``err`` itself when the files look fine."""
        cls = _TV_CIFAR10
        folder = os.path.join(self.root, self.data_folder)
        checksums = self._checksums()
        missing = [name for name, _ in checksums if not os.path.isfile(os.path.join(folder, name))]
        if missing == [cls.meta["filename"]]:  # torchvision downloads again only when a batch is missing
            return DatasetNotFoundError(
                f"CIFAR-10 not found: '{folder}' lacks {missing[0]}: copy it there from {cls.filename}, or delete "
                f"the folder and set data.download: true (--data.download true) to download it again.")
        if missing:
            if not os.path.isdir(folder):
                problem = f"folder '{folder}' does not exist"
            elif len(missing) == len(checksums):
                problem = f"'{folder}' holds none of the batch files ({', '.join(missing)})"
            else:
                problem = f"'{folder}' lacks {', '.join(missing)}"
            return DatasetNotFoundError(self._not_found_message(problem))
        fix = ("delete it and set data.download: true (--data.download true) to download it again, or copy the "
               f"original file from {cls.filename} there.")
        wrong = [(name, md5, actual) for name, md5 in checksums
                 if (actual := calculate_md5(os.path.join(folder, name))) != md5]
        if len(wrong) == 1:
            name, md5, actual = wrong[0]
            return DatasetNotFoundError(f"CIFAR-10 file '{os.path.join(folder, name)}' is corrupted (md5 {actual}, "
                                        f"expected {md5}): {fix}")
        if wrong:
            return DatasetNotFoundError(
                f"CIFAR-10 files in '{folder}' are corrupted or not CIFAR-10: {len(wrong)} of {len(checksums)} fail "
                f"their md5 sum ({', '.join(name for name, _, _ in wrong)}): point data.root at the folder that holds "
                "the real 'cifar-10-batches-py', or delete the folder and set data.download: true "
                "(--data.download true) to download it again.")
        split = cls.train_list if train else cls.test_list
        for name, meta_key in [*((n, None) for n, _ in split), (cls.meta["filename"], cls.meta["key"])]:
            path = os.path.join(folder, name)
            problem = pickle_problem(path, meta_key)
            if problem is not None:
                return DatasetValueError(f"CIFAR-10 file '{path}' is corrupted ({problem}): {fix}")
        return err
