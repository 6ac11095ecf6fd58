"""Writers of small datasets in the exact on-disk formats that torchvision reads.

Plain functions (no pytest fixtures) so any test can import them::

    from fixtures_data import cifar10_files, patch_cifar10_checksums, write_cifar10, write_mnist

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


def cifar10_files(root: Path, monkeypatch, n_per_batch: int = 10, n_test: int = 10) -> dict[str, np.ndarray]:
    """:func:`write_cifar10` into ``root``, with torchvision's md5 sums patched to accept the files."""
    expected = write_cifar10(root, n_per_batch=n_per_batch, n_test=n_test)
    patch_cifar10_checksums(monkeypatch, root)
    return expected


# -------------------------------------------------------------------------------------- Speech Commands

SPEECH_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SPEECH_LABELS = (*SPEECH_WORDS, "unknown", "silence")
SPEECH_SPEAKERS = ("0a7c2a8d", "1b4c9e2f", "c0ffee11")
SPEECH_LONG_CLIP = "left/1b4c9e2f_nohash_0.wav"  # 20000 samples: must be cut to its first 16000
SPEECH_SHORT_CLIP = "no/0a7c2a8d_nohash_1.wav"  # 8000 samples: must be zero-padded


def speech_clip(clip_id: int, length: int) -> np.ndarray:
    """Clip ``clip_id`` (>= 1) of the fixture: int16, sample t is ``32 * clip_id + t % 17``.

    Every sample is positive, so zero padding shows; ``x[0] // 32`` is the id; the period 17 does not
    divide 4000, so keeping the last 16000 samples of a 20000-sample clip instead of the first is caught.
    """
    t = np.arange(length)
    return (32 * clip_id + t % 17).astype(np.int16)


def speech_noise(index: int, length: int) -> np.ndarray:
    """Background noise recording ``index``: seeded uniform int16 over the full range (so -32768 occurs)."""
    rng = np.random.default_rng(1000 + index)
    noise = rng.integers(-32768, 32768, size=length, dtype=np.int16)
    noise[length // 2] = -32768
    return noise


def write_speech_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> None:
    """A mono 16-bit PCM WAV file, as in the real dataset."""
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), samples, rate, subtype="PCM_16")


def write_speech_commands(root: Path, words_per_class: int = 4, extra_words: tuple[str, ...] = ("bed", "cat"),
                          clips_per_extra_word: int = 6, noise_seconds: tuple[float, ...] = (3.0, 2.5)) -> dict:
    """Write Speech Commands v0.02 in torchaudio's layout under ``root/SpeechCommands/speech_commands_v0.02``.

    Word ``w`` (index in :data:`SPEECH_WORDS`) gets ``words_per_class + w % 3`` clips, each extra word
    ``clips_per_extra_word``; clip ``j`` of a word is ``<speaker j % 3>_nohash_<j // 3>.wav``. Clip ``j``
    goes to validation_list.txt when ``j % 4 == 1``, to testing_list.txt when ``j % 4 == 3``, else to
    training. Clip ids count from 1 in writing order (words, then extra words); the content is
    :func:`speech_clip`. Lengths are 16000 samples except: clip 0 of word ``w`` has ``12000 + 500 * w``,
    :data:`SPEECH_SHORT_CLIP` 8000 and :data:`SPEECH_LONG_CLIP` 20000. ``_background_noise_`` holds one
    :func:`speech_noise` recording per entry of ``noise_seconds`` (``noise_<k>.wav``), plus a README.md,
    and the top folder a LICENSE, like the real archive.

    Returns ``{"data_path": Path, "clips": {relative path: {"id", "word", "label", "split", "length"}},
    "noise": {file name: int16 array}}``; ``label`` is the 12-class label (extra words: 10, unknown).
    """
    data = Path(root) / "SpeechCommands" / "speech_commands_v0.02"
    data.mkdir(parents=True, exist_ok=True)
    (data / "LICENSE").write_text("fixture\n")
    plan = [(w, words_per_class + i % 3) for i, w in enumerate(SPEECH_WORDS)]
    plan += [(w, clips_per_extra_word) for w in extra_words]
    clips: dict[str, dict] = {}
    clip_id = 0
    for word, count in plan:
        for j in range(count):
            clip_id += 1
            rel = f"{word}/{SPEECH_SPEAKERS[j % 3]}_nohash_{j // 3}.wav"
            if rel == SPEECH_LONG_CLIP:
                length = 20000
            elif rel == SPEECH_SHORT_CLIP:
                length = 8000
            elif j == 0:
                length = 12000 + 500 * (SPEECH_WORDS.index(word) if word in SPEECH_WORDS else 0)
            else:
                length = 16000
            split = "val" if j % 4 == 1 else "test" if j % 4 == 3 else "train"
            label = SPEECH_WORDS.index(word) if word in SPEECH_WORDS else SPEECH_LABELS.index("unknown")
            write_speech_wav(data / rel, speech_clip(clip_id, length))
            clips[rel] = {"id": clip_id, "word": word, "label": label, "split": split, "length": length}
    for split, name in (("val", "validation_list.txt"), ("test", "testing_list.txt")):
        (data / name).write_text("".join(f"{rel}\n" for rel in sorted(clips) if clips[rel]["split"] == split))
    noise = {}
    for k, seconds in enumerate(noise_seconds):
        noise[f"noise_{k}.wav"] = speech_noise(k, int(seconds * 16000))
        write_speech_wav(data / "_background_noise_" / f"noise_{k}.wav", noise[f"noise_{k}.wav"])
    (data / "_background_noise_" / "README.md").write_text("background noise\n")
    return {"data_path": data, "clips": clips, "noise": noise}
