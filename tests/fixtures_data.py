"""Writers of small datasets in the exact on-disk formats that torchvision reads.

Plain functions (no pytest fixtures) so any test can import them::

    from fixtures_data import write_mnist, write_cifar10, patch_cifar10_checksums

Every image has a known pattern, so a test can check that a given image and label come out right:

* MNIST image ``i`` (train ``i`` in 0..n_train-1, test ``i`` in n_train..): pixel (r, c) is
  ``(4 * r + c + i) % 256`` (not symmetric in r and c, so a transpose is caught), label ``(3 * i) % 10``.
* CIFAR-10 image ``i`` (train batches in order, then the test batch): the R plane is ``i`` everywhere,
  the G plane is ``100 + r`` in row r, the B plane is ``200 + c`` in column c; label ``i % 10``.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np

CIFAR10_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                       "truck"]
CIFAR10_TRAIN_FILES = [f"data_batch_{k}" for k in range(1, 6)]


# ------------------------------------------------------------------------------------------------ MNIST

def mnist_images(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixture's MNIST images ``start..start+n-1`` (uint8 (n, 28, 28)) and labels (int64 (n,))."""
    i = np.arange(start, start + n)[:, None, None]
    r = np.arange(28)[None, :, None]
    c = np.arange(28)[None, None, :]
    images = ((4 * r + c + i) % 256).astype(np.uint8)
    labels = (3 * np.arange(start, start + n)) % 10
    return images, labels.astype(np.int64)


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """An idx3-ubyte file: big-endian magic 2051 (0x00000803: uint8, 3 dims), n, rows, cols, pixels."""
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">4i", 2051, n, rows, cols) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """An idx1-ubyte file: big-endian magic 2049 (0x00000801: uint8, 1 dim), n, labels."""
    path.write_bytes(struct.pack(">2i", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 60, n_test: int = 20) -> dict[str, np.ndarray]:
    """Write MNIST in ``root/MNIST/raw`` with torchvision's uncompressed file names.

    torchvision's ``MNIST._check_exists`` looks for ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (no md5).
    Returns the arrays written: x_train, y_train, x_test, y_test.
    """
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    x_train, y_train = mnist_images(0, n_train)
    x_test, y_test = mnist_images(n_train, n_test)
    write_idx_images(raw / "train-images-idx3-ubyte", x_train)
    write_idx_labels(raw / "train-labels-idx1-ubyte", y_train)
    write_idx_images(raw / "t10k-images-idx3-ubyte", x_test)
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", y_test)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


# --------------------------------------------------------------------------------------------- CIFAR-10

class Py2Str(bytes):
    """A Python 2 ``str`` in a pickle: loads as ``str`` with encoding="latin1", as ``bytes`` with "bytes".

    The real CIFAR-10 batches were pickled by Python 2, so torchvision (latin1) sees ``"data"`` and the
    dataset's web page recipe (``encoding="bytes"``) sees ``b"data"``; the fixture behaves the same.
    """


class _Py2Pickler(pickle._Pickler):
    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: Py2Str) -> None:
        data = bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[Py2Str] = save_py2_str


def _py2_pickle(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def cifar10_images(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixture's CIFAR-10 images ``start..start+n-1`` (uint8 (n, 3, 32, 32) NCHW) and labels."""
    images = np.empty((n, 3, 32, 32), dtype=np.uint8)
    images[:, 0] = (np.arange(start, start + n) % 256)[:, None, None]
    images[:, 1] = (100 + np.arange(32))[None, :, None]
    images[:, 2] = (200 + np.arange(32))[None, None, :]
    return images, (np.arange(start, start + n) % 10).astype(np.int64)


def _write_cifar_batch(path: Path, batch_label: str, images: np.ndarray, labels: np.ndarray) -> None:
    # b"data" is uint8 (N, 3072): per image the 1024 R values (row-major), then G, then B.
    entry = {
        Py2Str(b"batch_label"): Py2Str(batch_label.encode()),
        Py2Str(b"labels"): [int(v) for v in labels],
        Py2Str(b"data"): np.ascontiguousarray(images.reshape(len(images), 3072)),
        Py2Str(b"filenames"): [Py2Str(f"img_{k}.png".encode()) for k in range(len(images))],
    }
    _py2_pickle(entry, path)


def write_cifar10(root: Path, n_per_batch: int = 10, n_test: int = 10) -> dict[str, np.ndarray]:
    """Write CIFAR-10 in ``root/cifar-10-batches-py``: data_batch_1..5, test_batch, batches.meta.

    Returns the arrays written (images NCHW): x_train, y_train, x_test, y_test. torchvision checks md5
    sums; use :func:`patch_cifar10_checksums` to point it at these files.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for k, name in enumerate(CIFAR10_TRAIN_FILES):
        x, y = cifar10_images(k * n_per_batch, n_per_batch)
        _write_cifar_batch(folder / name, f"training batch {k + 1} of 5", x, y)
        xs.append(x)
        ys.append(y)
    x_test, y_test = cifar10_images(5 * n_per_batch, n_test)
    _write_cifar_batch(folder / "test_batch", "testing batch 1 of 1", x_test, y_test)
    meta = {
        Py2Str(b"num_cases_per_batch"): n_per_batch,
        Py2Str(b"label_names"): [Py2Str(name.encode()) for name in CIFAR10_LABEL_NAMES],
        Py2Str(b"num_vis"): 3072,
    }
    _py2_pickle(meta, folder / "batches.meta")
    return {"x_train": np.concatenate(xs), "y_train": np.concatenate(ys), "x_test": x_test, "y_test": y_test}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def patch_cifar10_checksums(monkeypatch, root: Path) -> None:
    """Make ``torchvision.datasets.CIFAR10`` accept the fixture files in ``root`` (md5 sums patched)."""
    import torchvision

    folder = Path(root) / "cifar-10-batches-py"
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[name, _md5(folder / name)] for name in CIFAR10_TRAIN_FILES])
    monkeypatch.setattr(cls, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / "batches.meta")})
