"""MNIST through torchvision's reader (idx files in ``root/MNIST/raw``)."""

from __future__ import annotations

import math
import os
import re
import struct

import torchvision
from torch import Tensor

from .base import ArrayDataModule
from .errors import DatasetNotFoundError, DatasetValueError, download_failed_message, guarded_download, short_reason

__all__ = ["MNIST"]

_TV_MNIST = torchvision.datasets.MNIST  # for its mirrors; the reader is looked up at call time (tests replace it)

#: The idx files torchvision reads, per split: (images, labels).
_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_ALL_FILES = (*_FILES[True], *_FILES[False])


def idx_problem(path: str, ndim: int, image_size: tuple[int, int] = (28, 28)) -> str | None:
    """What is wrong with the uint8 idx file ``path`` of ``ndim`` dimensions (3: images, 1: labels), or
    None when its header is right and its length matches the header."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty"
    header_size = 4 + 4 * ndim
    with open(path, "rb") as f:
        header = f.read(header_size)
    if len(header) < header_size:
        return f"{size} bytes, shorter than the {header_size}-byte idx header"
    if header[:4] != bytes([0, 0, 0x08, ndim]):
        return (f"not an idx{ndim}-ubyte file: magic number 0x{header[:4].hex()}, expected 0x000008{ndim:02x}"
                + (" (a .gz archive? torchvision reads the uncompressed file)" if header[:2] == b"\x1f\x8b" else ""))
    dims = struct.unpack(f">{ndim}I", header[4:])
    if ndim == 3 and tuple(dims[1:]) != tuple(image_size):
        return f"images of {dims[1]}x{dims[2]} pixels, expected {image_size[0]}x{image_size[1]}"
    expected = header_size + math.prod(dims)
    if size < expected:
        return f"truncated: {size} bytes, the header announces {expected}"
    if size > expected:
        return f"{size - expected} bytes after the {expected} the header announces"
    return None


class MNIST(ArrayDataModule):
    """MNIST handwritten digits: 60000 training and 10000 test images, (1, 28, 28), 10 classes.

    Files are read (and, with ``download``, fetched) by ``torchvision.datasets.MNIST``; they live in
    ``root/MNIST/raw`` as the four uncompressed idx files. 1000 training images are held out for
    validation by default (59000 remain for training); no augmentation by default.
    """

    name = "MNIST"
    num_classes = 10
    input_shape = (1, 28, 28)
    data_folder = "MNIST/raw"

    def download_dataset(self) -> None:
        """Download with torchvision; a failed download raises :class:`DatasetError` and leaves nothing behind
        (no empty ``MNIST/raw``, no half-written archive); files that were there before are kept."""
        raw = os.path.join(self.root, self.data_folder)

        def fetch() -> None:
            try:
                torchvision.datasets.MNIST(self.root, train=True, download=True)
            except Exception as err:
                if self._missing_files():
                    raise  # the download failed: guarded_download cleans up
                raise self._read_error(err, train=True) from None  # all files there, but unreadable

        def failure(err: Exception) -> str:
            url, reason = _download_error(err, self._missing_files())
            return download_failed_message(self.name, url, reason, raw,
                                           f"{', '.join(_ALL_FILES)}: the uncompressed idx files")

        guarded_download(fetch, self.root, ["MNIST"], failure)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        try:
            ds = torchvision.datasets.MNIST(self.root, train=train, download=False)
        except Exception as err:
            raise self._read_error(err, train) from None
        x, y = ds.data, ds.targets
        if len(x) != len(y):
            images, labels = (os.path.join(self.root, self.data_folder, f) for f in _FILES[train])
            raise DatasetValueError(
                f"MNIST files do not match: '{images}' holds {len(x)} images but '{labels}' {len(y)} labels; "
                "replace both with the original files (or delete them and set data.download: true).")
        return x.unsqueeze(1).contiguous(), y.long()

    # --------------------------------------------------------------------------------------- helpers

    def _missing_files(self) -> list[str]:
        raw = os.path.join(self.root, self.data_folder)
        return [name for name in _ALL_FILES if not os.path.isfile(os.path.join(raw, name))]

    def _read_error(self, err: Exception, train: bool) -> Exception:
        """The one-line error for torchvision failing to read a split, or ``err`` itself when the files look
        fine (then it is not a problem of the data)."""
        raw = os.path.join(self.root, self.data_folder)
        missing = self._missing_files()
        if isinstance(err, RuntimeError) and "not found" in str(err) and missing:
            if not os.path.isdir(raw):
                problem = f"folder '{raw}' does not exist"
            elif len(missing) == len(_ALL_FILES):
                problem = f"no idx files in '{raw}' (expected {', '.join(_ALL_FILES)})"
            else:
                problem = f"'{raw}' lacks {', '.join(missing)}"
            return DatasetNotFoundError(self._not_found_message(problem))
        for name, ndim in zip(_FILES[train], (3, 1)):
            path = os.path.join(raw, name)
            problem = idx_problem(path, ndim, self.input_shape[1:]) if os.path.isfile(path) else None
            if problem is not None:
                return DatasetValueError(
                    f"MNIST file '{path}' is corrupted ({problem}); delete it and set data.download: true "
                    "(--data.download true) to download it again, or copy the original file there.")
        return err


def _download_error(err: Exception, missing: list[str]) -> tuple[str, str]:
    """(url, reason) of a failed torchvision MNIST download, from its "Error downloading <file>: Tried
    <mirror>, got: <error>" message when it has that form."""
    text = str(err)
    match = re.match(r"Error downloading (\S+):", text)
    tried = re.findall(r"Tried (\S+), got:\n(.*)", text)
    if match and tried:
        attempts = [(mirror + match.group(1), _urlopen_reason(reason)) for mirror, reason in tried]
        url, reason = attempts[0]
        return url, reason + "".join(f"; also tried {u}: {r}" for u, r in attempts[1:])
    mirrors = _TV_MNIST.mirrors
    name = f"{missing[0]}.gz" if missing else ""
    return (f"{mirrors[0]}{name}" if mirrors else "the MNIST mirrors"), short_reason(err)


def _urlopen_reason(text: str) -> str:
    match = re.fullmatch(r"<urlopen error (.*)>", text.strip())
    return " ".join((match.group(1) if match else text).split())
