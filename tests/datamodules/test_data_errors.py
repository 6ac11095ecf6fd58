"""Bad data roots end in one line that says what is wrong and what to do, never in a traceback.

Empty roots, missing, truncated and corrupted files of MNIST (idx), CIFAR-10 (pickle batches with md5 sums)
and Speech Commands (WAV folder with split lists) raise a :class:`DatasetError` with the path and the fix, and
nothing chained to it; a failed download removes every file and folder it created (and nothing that was
there before). Through the CLI the same cases exit with code 2, one ``advtrain: error:`` line on stderr and no
checkpoint. No test needs the network: mirrors point at a closed local port, or the subprocess's proxy does.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torchvision
from cli_utils import advtrain, config
from fixtures_data import (
    patch_cifar10_checksums,
    speech_clip,
    write_cifar10,
    write_idx_labels,
    write_mnist,
    write_speech_commands,
    write_speech_wav,
)

from advtrain.datamodules import (
    CIFAR10,
    MNIST,
    DatasetError,
    DatasetNotFoundError,
    DatasetValueError,
    SpeechCommands,
)

CLOSED = "http://127.0.0.1:9/"  # the discard port: nothing listens, so a connection is refused at once
CLI_FLAGS = ("--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false")
# urllib (torchvision) and torch.hub (torchaudio) honour these, so a download fails in milliseconds
OFFLINE = {"http_proxy": CLOSED, "https_proxy": CLOSED, "HTTP_PROXY": CLOSED, "HTTPS_PROXY": CLOSED,
           "no_proxy": "", "NO_PROXY": ""}


def _raises(cls, fn, *words) -> str:
    """Run ``fn``; it must raise ``cls`` with one line holding every word, and no chained traceback."""
    with pytest.raises(cls) as info:
        fn()
    err, message = info.value, str(info.value)
    assert isinstance(err, DatasetError)
    assert "\n" not in message, message
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), "chained traceback"
    for word in words:
        assert str(word) in message, f"{word!r} not in: {message}"
    return message


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------------------------------------- MNIST

def test_mnist_empty_or_incomplete_root(tmp_path):
    _raises(DatasetNotFoundError, lambda: MNIST(root=str(tmp_path)).setup("fit"),
            f"'{tmp_path}/MNIST/raw' does not exist", "data.root", "data.download: true")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _raises(DatasetNotFoundError, lambda: MNIST(root=str(tmp_path)).setup("test"),
            f"no idx files in '{raw}'", "t10k-images-idx3-ubyte", "data.download: true")
    write_mnist(tmp_path)
    os.remove(raw / "t10k-labels-idx1-ubyte")
    message = _raises(DatasetNotFoundError, lambda: MNIST(root=str(tmp_path), val_size=10).setup("test"),
                      f"'{raw}' lacks t10k-labels-idx1-ubyte", "data.root")
    assert "torchvision" not in message and "download=True" not in message  # no Python-level advice


@pytest.mark.parametrize("name, corrupt, reason", [
    ("train-images-idx3-ubyte", lambda b: b"", "the file is empty"),
    ("train-images-idx3-ubyte", lambda b: b[:1000], "truncated: 1000 bytes, the header announces 47056"),
    ("train-labels-idx1-ubyte", lambda b: b[:20], "truncated: 20 bytes, the header announces 68"),
    ("train-images-idx3-ubyte", lambda b: b"\x1f\x8b" + b[2:], "a .gz archive?"),
    ("train-labels-idx1-ubyte", lambda b: b[:4], "shorter than the 8-byte idx header"),
    ("train-images-idx3-ubyte", lambda b: b + b"\0\0", "2 bytes after the 47056"),
], ids=["empty", "truncated-images", "truncated-labels", "gzip", "header-only", "trailing-bytes"])
def test_mnist_corrupted_file_is_named(tmp_path, name, corrupt, reason):
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / name
    path.write_bytes(corrupt(path.read_bytes()))
    words = (f"MNIST file '{path}' is corrupted", reason, "delete it", "data.download: true")
    _raises(DatasetValueError, lambda: MNIST(root=str(tmp_path), val_size=10).setup("fit"), *words)
    # download: true does not fetch files that exist: prepare_data names the corrupted one, and keeps it
    _raises(DatasetValueError, lambda: MNIST(root=str(tmp_path), val_size=10, download=True).prepare_data(), *words)
    assert path.exists()


def test_mnist_images_and_labels_of_different_lengths(tmp_path):
    write_mnist(tmp_path, n_train=60, n_test=20)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte").write_bytes((raw / "train-labels-idx1-ubyte").read_bytes())
    _raises(DatasetValueError, lambda: MNIST(root=str(tmp_path)).setup("test"),
            "holds 20 images but", "60 labels")


def test_mnist_labels_out_of_range(tmp_path):
    write_mnist(tmp_path, n_train=60, n_test=20)
    labels = np.full(20, 3, dtype=np.uint8)
    labels[7] = 12
    write_idx_labels(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", labels)
    _raises(DatasetValueError, lambda: MNIST(root=str(tmp_path)).setup("test"),
            f"MNIST test labels in '{tmp_path}/MNIST/raw' run from 3 to 12, expected 0..9")


def test_val_size_larger_than_the_data_is_a_dataset_error(tmp_path):
    write_mnist(tmp_path, n_train=60)
    message = _raises(DatasetValueError, lambda: MNIST(root=str(tmp_path), val_size=1000).setup("fit"),
                      "data.val_size=1000", "60 training examples")
    assert isinstance(DatasetValueError(message), ValueError)


def _offline_mnist(monkeypatch):
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [CLOSED, CLOSED + "second/"])


def test_mnist_failed_download_leaves_nothing(tmp_path, monkeypatch):
    _offline_mnist(monkeypatch)
    root = tmp_path / "new" / "data"  # two folders the download creates
    message = _raises(DatasetError, lambda: MNIST(root=str(root), download=True).prepare_data(),
                      f"downloading MNIST from {CLOSED}train-images-idx3-ubyte.gz failed", "Connection refused",
                      f"also tried {CLOSED}second/train-images-idx3-ubyte.gz",
                      f"put the files in '{root}/MNIST/raw' by hand", "t10k-labels-idx1-ubyte",
                      "retry with network access")
    assert "Traceback" not in message and "<urlopen error" not in message
    assert not (tmp_path / "new").exists()  # no empty MNIST/raw that breaks the next run
    # an existing root is kept, and so is everything in it that the download did not create
    (tmp_path / "keep.txt").write_text("mine")
    _raises(DatasetError, lambda: MNIST(root=str(tmp_path), download=True).prepare_data(), "downloading MNIST")
    assert _tree(tmp_path) == ["keep.txt"]


def test_mnist_partial_download_is_removed_but_earlier_files_kept(tmp_path, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"from an earlier run")
    calls = []

    def flaky(url, download_root, filename, md5):  # the first file arrives, the second download fails
        calls.append(url)
        if len(calls) > 1:
            raise urllib.error.URLError(ConnectionResetError(104, "Connection reset by peer"))
        Path(download_root, filename).write_bytes(b"gz")
        Path(download_root, filename[:-3]).write_bytes(b"idx")
        (Path(download_root) / "half").mkdir()

    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [CLOSED])
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", flaky)
    _raises(DatasetError, lambda: MNIST(root=str(tmp_path), download=True).prepare_data(),
            f"downloading MNIST from {CLOSED}train-labels-idx1-ubyte.gz failed", "Connection reset by peer")
    assert len(calls) == 2
    assert _tree(tmp_path) == ["MNIST", "MNIST/raw", "MNIST/raw/t10k-images-idx3-ubyte"]
    assert (raw / "t10k-images-idx3-ubyte").read_bytes() == b"from an earlier run"

    def interrupted(url, download_root, filename, md5):  # Ctrl-C in the middle of a file
        Path(download_root, filename).write_bytes(b"g")
        raise KeyboardInterrupt

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        MNIST(root=str(tmp_path), download=True).prepare_data()
    assert _tree(tmp_path) == ["MNIST", "MNIST/raw", "MNIST/raw/t10k-images-idx3-ubyte"]


# ------------------------------------------------------------------------------------------- CIFAR-10

def test_cifar10_empty_or_incomplete_root(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    _raises(DatasetNotFoundError, lambda: CIFAR10(root=str(tmp_path)).setup("fit"),
            f"'{folder}' does not exist", "data.root", "data.download: true")
    folder.mkdir()
    _raises(DatasetNotFoundError, lambda: CIFAR10(root=str(tmp_path)).setup("test"),
            f"'{folder}' holds none of the batch files", "data_batch_1")
    write_cifar10(tmp_path)
    patch_cifar10_checksums(monkeypatch, tmp_path)
    os.remove(folder / "data_batch_4")
    _raises(DatasetNotFoundError, lambda: CIFAR10(root=str(tmp_path), val_size=10).setup("fit"),
            f"'{folder}' lacks data_batch_4", "data.download: true")
    write_cifar10(tmp_path)
    os.remove(folder / "batches.meta")  # torchvision's download would not restore it: say so
    _raises(DatasetNotFoundError, lambda: CIFAR10(root=str(tmp_path), val_size=10).setup("test"),
            f"'{folder}' lacks batches.meta", "copy it there from cifar-10-python.tar.gz", "delete the folder")


def test_cifar10_files_failing_their_md5_sum(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    # real md5 sums: every fixture file fails them
    _raises(DatasetNotFoundError, lambda: CIFAR10(root=str(tmp_path)).setup("test"),
            f"CIFAR-10 files in '{folder}' are corrupted or not CIFAR-10: 7 of 7 fail their md5 sum",
            "point data.root at the folder that holds the real 'cifar-10-batches-py'", "data.download: true")
    patch_cifar10_checksums(monkeypatch, tmp_path)
    (folder / "data_batch_3").write_bytes(b"not the same bytes")
    _raises(DatasetNotFoundError, lambda: CIFAR10(root=str(tmp_path)).setup("fit"),
            f"CIFAR-10 file '{folder / 'data_batch_3'}' is corrupted (md5 ", "delete it", "data.download: true")


@pytest.mark.parametrize("name, corrupt, reason", [
    ("data_batch_2", lambda b: b"", "the file is empty"),
    ("data_batch_2", lambda b: b[:500], "not a readable pickle: UnpicklingError: pickle data was truncated"),
    ("data_batch_5", lambda b: pickle.dumps({"data": [1, 2]}), "'data' is list, expected uint8 (N, 3072)"),
    ("data_batch_1", lambda b: pickle.dumps([1, 2]), "a pickled list, expected a dict"),
    ("batches.meta", lambda b: b[:30], "not a readable pickle"),
], ids=["empty", "truncated", "bad-data", "not-a-dict", "truncated-meta"])
def test_cifar10_corrupted_pickle_is_named(tmp_path, monkeypatch, name, corrupt, reason):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / name
    path.write_bytes(corrupt(path.read_bytes()))
    patch_cifar10_checksums(monkeypatch, tmp_path)  # md5 sums that pass: the pickle itself is broken
    words = (f"CIFAR-10 file '{path}' is corrupted", reason, "delete it", "data.download: true")
    _raises(DatasetValueError, lambda: CIFAR10(root=str(tmp_path), val_size=10).setup("fit"), *words)
    _raises(DatasetValueError, lambda: CIFAR10(root=str(tmp_path), val_size=10, download=True).prepare_data(),
            *words)
    assert path.exists()


def test_cifar10_failed_download_leaves_nothing(tmp_path, monkeypatch):
    url = CLOSED + "cifar-10-python.tar.gz"
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", url)
    root = tmp_path / "new"
    _raises(DatasetError, lambda: CIFAR10(root=str(root), download=True).prepare_data(),
            f"downloading CIFAR-10 from {url} failed (", "Connection refused",
            f"put the files in '{root / 'cifar-10-batches-py'}' by hand", "data_batch_5, test_batch, batches.meta",
            "retry with network access")
    assert not root.exists()
    # files from before (here one that fails its md5 sum, so torchvision downloads again) are kept
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"old")
    _raises(DatasetError, lambda: CIFAR10(root=str(tmp_path), download=True).prepare_data(), "downloading CIFAR-10")
    assert _tree(tmp_path) == ["cifar-10-batches-py", "cifar-10-batches-py/data_batch_1"]


def test_cifar10_half_extracted_archive_is_removed(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("data_batch_1", "data_batch_2", "test_batch"):
            data = os.urandom(200_000)  # incompressible: truncating the archive cuts into the last members
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive.write_bytes(buffer.getvalue()[:300_000])
    from torchvision.datasets.utils import calculate_md5

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", CLOSED + "cifar-10-python.tar.gz")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", calculate_md5(str(archive)))  # so it is used
    _raises(DatasetError, lambda: CIFAR10(root=str(tmp_path), download=True).prepare_data(),
            f"extracting CIFAR-10 from '{archive}'", "delete it and keep data.download: true")
    assert _tree(tmp_path) == ["cifar-10-python.tar.gz"]  # the archive was there before: kept


# ------------------------------------------------------------------------------------- Speech Commands

def _speech(root: Path) -> dict:
    return write_speech_commands(root, words_per_class=1, extra_words=("bed",), clips_per_extra_word=2,
                                 noise_seconds=(1.5,))


def test_speech_commands_empty_folder_and_missing_lists(tmp_path):
    data = tmp_path / "SpeechCommands" / "speech_commands_v0.02"
    data.mkdir(parents=True)
    _raises(DatasetNotFoundError, lambda: SpeechCommands(root=str(tmp_path)).setup("fit"),
            f"Speech Commands is incomplete: folder '{data}' is empty", "data.root",
            f"delete the folder '{data}' and set data.download: true")  # torchaudio skips an existing folder
    (data / "validation_list.txt").write_text("")
    (data / "testing_list.txt").write_text("")
    _raises(DatasetNotFoundError, lambda: SpeechCommands(root=str(tmp_path)).setup("fit"),
            f"no word clips (<word>/<speaker>_nohash_<k>.wav) in '{data}'")


@pytest.mark.parametrize("corrupt, reason", [
    (lambda b: b"", "Format not recognised"),
    (lambda b: b[:20], "Malformed 'fmt ' chunk"),  # cut inside the header
    (lambda b: b"garbage" * 40, "Format not recognised"),
], ids=["empty", "cut-header", "garbage"])
def test_speech_commands_corrupted_wav_is_named(tmp_path, corrupt, reason):
    info = _speech(tmp_path)
    path = info["data_path"] / "yes" / "0a7c2a8d_nohash_0.wav"  # a training clip
    path.write_bytes(corrupt(path.read_bytes()))
    message = _raises(DatasetValueError, lambda: SpeechCommands(root=str(tmp_path)).setup("fit"),
                      f"Speech Commands file '{path}' is corrupted", reason,
                      f"delete the folder '{info['data_path']}'", "data.download: true")
    assert "Error opening" not in message
    assert not list((tmp_path / "SpeechCommands").glob("advtrain_cache_*"))  # no cache of a broken split


def test_speech_commands_wrong_sample_rate_and_binary_list(tmp_path):
    info = _speech(tmp_path)
    noise = info["data_path"] / "_background_noise_" / "noise_0.wav"
    write_speech_wav(noise, speech_clip(1, 24000), rate=8000)
    _raises(DatasetValueError, lambda: SpeechCommands(root=str(tmp_path), cache=False).setup("fit"),
            f"'{noise}' has a sample rate of 8000 Hz", "16000 Hz", "data.download: true")
    (info["data_path"] / "testing_list.txt").write_bytes(b"\xff\xfe\x00\x01 not text")
    _raises(DatasetValueError, lambda: SpeechCommands(root=str(tmp_path), cache=False).setup("test"),
            "testing_list.txt' is corrupted (not UTF-8 text")


def _truncated_speech_archive() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("validation_list.txt", "yes/a_nohash_0.wav", "no/b_nohash_0.wav"):
            data = os.urandom(150_000)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()[:250_000]


def test_speech_commands_failed_download_leaves_nothing(tmp_path, monkeypatch):
    import torchaudio.datasets.speechcommands as ta_speech

    def refused(url, dst, hash_prefix=None):
        assert url == "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
        Path(dst).write_bytes(b"half an archive")  # a downloader that writes in place
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(ta_speech, "download_url_to_file", refused)
    root = tmp_path / "new"  # torch.hub cannot create it: prepare_data does, and removes it again
    _raises(DatasetError, lambda: SpeechCommands(root=str(root), download=True).prepare_data(),
            "downloading Speech Commands from http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz "
            "failed ([Errno 111] Connection refused)",
            f"put the files in '{root}/SpeechCommands/speech_commands_v0.02' by hand", "validation_list.txt",
            "retry with network access")
    assert not root.exists()

    # an archive that arrives cut short: the half-extracted folder goes, the older cache file stays
    def truncated(url, dst, hash_prefix=None):
        Path(dst).write_bytes(_truncated_speech_archive())

    monkeypatch.setattr(ta_speech, "download_url_to_file", truncated)
    (tmp_path / "SpeechCommands").mkdir()
    (tmp_path / "SpeechCommands" / "advtrain_cache_old.pt").write_bytes(b"cache")
    _raises(DatasetError, lambda: SpeechCommands(root=str(tmp_path), download=True).prepare_data(),
            "downloading Speech Commands", "failed (")
    assert _tree(tmp_path) == ["SpeechCommands", "SpeechCommands/advtrain_cache_old.pt"]


def test_speech_commands_truncated_archive_from_before_is_kept(tmp_path):
    archive = tmp_path / "speech_commands_v0.02.tar.gz"
    archive.write_bytes(_truncated_speech_archive())
    _raises(DatasetError, lambda: SpeechCommands(root=str(tmp_path), download=True).prepare_data(),
            f"extracting Speech Commands from '{archive}'", "failed (EOFError: Compressed file ended",
            "if the archive is truncated or corrupted, delete it")
    assert _tree(tmp_path) == ["speech_commands_v0.02.tar.gz"]


# ------------------------------------------------------------------------------------------------- CLI

def _cli_fails(tmp_path, *args, words, env=None) -> str:
    proc = advtrain(*args, *CLI_FLAGS, cwd=tmp_path, check=False, env_extra=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("advtrain: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], f"{word!r} not in: {errors[0]}"
    assert not list(tmp_path.rglob("*.ckpt"))
    return errors[0]


def test_cli_mnist_empty_root_and_corrupted_file(tmp_path):
    (tmp_path / "empty").mkdir()
    _cli_fails(tmp_path, "fit", "-c", config("mnist/pgd_at.yaml"), "--data.init_args.root", "empty",
               words=("MNIST not found", "'empty/MNIST/raw' does not exist", "data.root", "data.download: true"))
    write_mnist(tmp_path / "bad", n_train=60, n_test=20)
    images = tmp_path / "bad" / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:3000])
    _cli_fails(tmp_path, "test", "-c", config("mnist/pgd_at.yaml"), "--data.init_args.root", "bad",
               words=("MNIST file 'bad/MNIST/raw/t10k-images-idx3-ubyte' is corrupted", "truncated",
                      "delete it", "data.download: true"))


def test_cli_cifar10_files_failing_md5(tmp_path):
    write_cifar10(tmp_path / "c", n_per_batch=2, n_test=2)
    _cli_fails(tmp_path, "fit", "-c", config("cifar10/pgd_at.yaml"), "--data.init_args.root", "c",
               words=("CIFAR-10 files in 'c/cifar-10-batches-py' are corrupted or not CIFAR-10", "md5",
                      "data.root", "data.download: true"))


def test_cli_speech_commands_corrupted_wav(tmp_path):
    info = _speech(tmp_path / "s")
    (info["data_path"] / "go" / "0a7c2a8d_nohash_0.wav").write_bytes(b"")
    _cli_fails(tmp_path, "fit", "-c", config("speech_commands/soundnet5.yaml"), "--data.init_args.root", "s",
               words=("'s/SpeechCommands/speech_commands_v0.02/go/0a7c2a8d_nohash_0.wav' is corrupted",
                      "Format not recognised", "data.download: true"))


@pytest.mark.parametrize("cfg, url, folder", [
    ("mnist/pgd_at.yaml", "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz",
     "dl/MNIST/raw"),
    ("speech_commands/soundnet5.yaml", "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
     "dl/SpeechCommands/speech_commands_v0.02"),
], ids=["mnist", "speech_commands"])
def test_cli_failed_download_leaves_nothing(tmp_path, cfg, url, folder):
    _cli_fails(tmp_path, "fit", "-c", config(cfg), "--data.init_args.root", "dl", "--data.init_args.download", "true",
               env=OFFLINE, words=("downloading", f"from {url} failed (", "Connection refused",
                                   f"put the files in '{folder}' by hand", "retry with network access"))
    assert not (tmp_path / "dl").exists()
