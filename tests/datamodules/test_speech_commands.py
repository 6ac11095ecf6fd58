"""Speech Commands: real soundfile reading on a fixture folder in torchaudio's exact layout."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile
import torch
from fixtures_data import (
    SPEECH_LABELS,
    SPEECH_LONG_CLIP,
    SPEECH_SHORT_CLIP,
    speech_clip,
    write_speech_commands,
    write_speech_wav,
)

from advtrain.datamodules import DatasetNotFoundError, SpeechCommands, TensorPairDataset

SPLITS = ("train", "val", "test")
SILENCE = 11
UNKNOWN = 10


@pytest.fixture
def speech(tmp_path):
    return tmp_path, write_speech_commands(tmp_path)


def _by_id(info: dict) -> dict[int, str]:
    return {clip["id"]: rel for rel, clip in info["clips"].items()}


def _word_rows(ds: TensorPairDataset, info: dict) -> dict[str, tuple[np.ndarray, int]]:
    """{relative path: (waveform (16000,), label)} of the non-silence rows, identified by their content."""
    by_id = _by_id(info)
    rows: dict[str, tuple[np.ndarray, int]] = {}
    for x, y in zip(ds.x[:, 0].numpy(), ds.y.tolist()):
        if y == SILENCE:
            continue
        rel = by_id[int(x[0]) // 32]
        assert rel not in rows, f"{rel} appears twice"
        rows[rel] = (x, y)
    return rows


def _find_in_noise(clip: np.ndarray, noise: dict[str, np.ndarray]) -> tuple[str, int] | None:
    for name, recording in noise.items():
        for offset in np.flatnonzero(recording[: len(recording) - 16000 + 1] == clip[0]):
            if np.array_equal(recording[offset: offset + 16000], clip):
                return name, int(offset)
    return None


def _silence_sources(ds: TensorPairDataset, noise: dict[str, np.ndarray]) -> list[tuple[str, int]]:
    found = [_find_in_noise(x, noise) for x in ds.x[ds.y == SILENCE][:, 0].numpy()]
    assert None not in found, "a silence clip is not a 1 s window of a background noise recording"
    return found


# ------------------------------------------------------------------------------------ splits and labels

def test_splits_follow_the_list_files_and_labels(speech):
    root, info = speech
    dm = SpeechCommands(root=str(root))
    dm.setup(None)
    assert (dm.num_classes, dm.input_shape, dm.labels) == (12, (1, 16000), SPEECH_LABELS)
    assert SPEECH_LABELS == ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "unknown",
                             "silence")
    for split in SPLITS:
        ds = dm.eval_dataset(split)
        assert ds is getattr(dm, f"{split}_set")
        rows = _word_rows(ds, info)
        expected = {rel for rel, clip in info["clips"].items() if clip["split"] == split}
        assert set(rows) == expected, split
        for rel, (_, label) in rows.items():
            assert label == info["clips"][rel]["label"], rel
    # the split lists are really what decides: every listed file is in val/test, nothing else is
    data = info["data_path"]
    for split, name in (("val", "validation_list.txt"), ("test", "testing_list.txt")):
        listed = set((data / name).read_text().split())
        assert set(_word_rows(dm.eval_dataset(split), info)) == listed
        assert listed.isdisjoint(_word_rows(dm.train_set, info))
    # concrete labels: command words by their index, other words are unknown
    rows = {**_word_rows(dm.train_set, info), **_word_rows(dm.val_set, info), **_word_rows(dm.test_set, info)}
    assert rows["yes/0a7c2a8d_nohash_0.wav"][1] == 0
    assert rows["go/c0ffee11_nohash_0.wav"][1] == 9
    assert rows["stop/1b4c9e2f_nohash_0.wav"][1] == 8
    assert rows["bed/0a7c2a8d_nohash_0.wav"][1] == UNKNOWN and rows["cat/c0ffee11_nohash_1.wav"][1] == UNKNOWN
    assert sorted(set(torch.cat([dm.train_set.y, dm.val_set.y, dm.test_set.y]).tolist())) == list(range(12))


def test_examples_are_shuffled_deterministically(speech):
    root, _ = speech
    a = SpeechCommands(root=str(root), cache=False).eval_dataset("train")
    b = SpeechCommands(root=str(root), cache=False).eval_dataset("train")
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.y.tolist() != sorted(a.y.tolist())  # not grouped by word: the first rows are a fair sample


# ----------------------------------------------------------------------------------------------- silence

def test_silence_clips_are_windows_of_the_noise_recordings(speech):
    root, info = speech
    dm = SpeechCommands(root=str(root))
    dm.setup(None)
    # ten word classes per split: train 2,3,3,2,3,3,2,3,3,2 = 26 -> mean 2.6 -> 3; val 13 -> 1; test 10 -> 1
    counts = {split: int((dm.eval_dataset(split).y == SILENCE).sum()) for split in SPLITS}
    assert counts == {"train": 3, "val": 1, "test": 1}
    for split in SPLITS:
        n_words = sum(c["split"] == split and c["label"] < UNKNOWN for c in info["clips"].values())
        assert counts[split] == int(n_words / 10 + 0.5)
    sources = {split: _silence_sources(dm.eval_dataset(split), info["noise"]) for split in SPLITS}
    drawn = [s for split in SPLITS for s in sources[split]]
    assert len(set(drawn)) == len(drawn)  # a different draw in each split

    many = SpeechCommands(root=str(root), silence_per_split=20, cache=False)
    for split in SPLITS:
        ds = many.eval_dataset(split)
        assert int((ds.y == SILENCE).sum()) == 20
        assert ds.x.shape[1:] == (1, 16000)
    train_sources = _silence_sources(many.eval_dataset("train"), info["noise"])
    assert {name for name, _ in train_sources} == set(info["noise"])  # both recordings are used
    assert len({offset for _, offset in train_sources}) > 15  # random offsets, not one window repeated
    assert train_sources != _silence_sources(many.eval_dataset("val"), info["noise"])

    none = SpeechCommands(root=str(root), silence_per_split=0, cache=False)
    assert SILENCE not in none.eval_dataset("train").y.tolist()


def test_silence_without_noise_recordings_fails_clearly(speech):
    root, info = speech
    for name in info["noise"]:
        os.remove(info["data_path"] / "_background_noise_" / name)
    with pytest.raises(DatasetNotFoundError, match="no background noise recording"):
        SpeechCommands(root=str(root), cache=False).setup("test")
    assert len(SpeechCommands(root=str(root), silence_per_split=0, cache=False).eval_dataset("test")) == 12


# ------------------------------------------------------------------------------------ waveforms, batches

def test_batches_are_float_waveforms_in_unit_range(speech):
    root, info = speech
    dm = SpeechCommands(root=str(root), batch_size=8, eval_batch_size=16)
    dm.setup("fit")
    assert dm.test_set is None  # fit loads train and val only
    assert dm.train_set.x.dtype == torch.int16 and dm.train_set.y.dtype == torch.int64
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.shape == (8, 1, 16000) and x.dtype == torch.float32 and y.shape == (8,) and y.dtype == torch.int64
    x, y = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert x.shape == (16, 1, 16000) and x.dtype == torch.float32
    x, y = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert x.shape == (13, 1, 16000) and dm.test_set is not None
    # the whole training split: values are int16 / 32768, in [-1, 1]; the noise reaches -1 exactly
    ds = dm.train_set
    x, y = dm.preprocess((ds.x, ds.y), train=True)
    assert torch.equal(x, ds.x.double().div(32768).float())
    assert float(x.min()) == -1.0 and float(x.max()) <= 1.0
    # one known clip: sample t of clip id is 32 * id + t % 17
    clip = info["clips"]["yes/c0ffee11_nohash_0.wav"]  # clip 2 of "yes": training, 16000 samples
    assert clip["split"] == "train"
    row = int((ds.x[:, 0, 0] == 32 * clip["id"]).nonzero().flatten()[0])
    assert int(y[row]) == 0
    assert torch.equal(x[row, 0], torch.from_numpy(speech_clip(clip["id"], 16000)).double().div(32768).float())


def test_short_clips_are_zero_padded_and_long_clips_cut(speech):
    root, info = speech
    dm = SpeechCommands(root=str(root), cache=False)
    rows = {}
    for split in SPLITS:
        rows.update(_word_rows(dm.eval_dataset(split), info))
    assert info["clips"][SPEECH_SHORT_CLIP]["length"] == 8000 and info["clips"][SPEECH_LONG_CLIP]["length"] == 20000
    short, _ = rows[SPEECH_SHORT_CLIP]
    assert np.array_equal(short[:8000], speech_clip(info["clips"][SPEECH_SHORT_CLIP]["id"], 8000))
    assert not short[8000:].any()
    long, _ = rows[SPEECH_LONG_CLIP]
    assert np.array_equal(long, speech_clip(info["clips"][SPEECH_LONG_CLIP]["id"], 20000)[:16000])
    for rel, clip in info["clips"].items():  # every clip, whatever its length
        n = min(clip["length"], 16000)
        assert rows[rel][0].shape == (16000,)
        assert np.array_equal(rows[rel][0][:n], speech_clip(clip["id"], n)) and not rows[rel][0][n:].any(), rel


# --------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("which", ["clip", "noise"])
def test_wrong_sample_rate_names_the_file(speech, which):
    root, info = speech
    if which == "clip":
        path = info["data_path"] / "up" / "0a7c2a8d_nohash_0.wav"  # a training clip
    else:
        path = info["data_path"] / "_background_noise_" / "noise_1.wav"
    write_speech_wav(path, speech_clip(1, 8000), rate=8000)
    with pytest.raises(ValueError, match="8000 Hz") as err:
        SpeechCommands(root=str(root), cache=False).setup("fit")
    assert str(path) in str(err.value) and "16000" in str(err.value)


def test_missing_dataset_fails_with_one_clear_message(tmp_path):
    folder = tmp_path / "SpeechCommands" / "speech_commands_v0.02"
    with pytest.raises(DatasetNotFoundError) as err:
        SpeechCommands(root=str(tmp_path))
    message = str(err.value)
    assert f"'{folder}' does not exist" in message
    assert "data.root" in message and "data.download: true" in message
    assert isinstance(err.value, FileNotFoundError)
    dm = SpeechCommands(root=str(tmp_path), download=True)  # downloaded in prepare_data: no error yet
    with pytest.raises(DatasetNotFoundError, match="call prepare_data"):
        dm.setup("fit")


def test_missing_list_file_or_listed_clip(speech):
    root, info = speech
    os.remove(info["data_path"] / "up" / "0a7c2a8d_nohash_0.wav")  # not listed: training just has one less
    assert len(SpeechCommands(root=str(root), cache=False).eval_dataset("train")) == 34
    os.remove(info["data_path"] / "up" / "1b4c9e2f_nohash_0.wav")  # listed in validation_list.txt
    with pytest.raises(DatasetNotFoundError, match="validation_list.txt"):
        SpeechCommands(root=str(root), cache=False).setup("test")
    os.remove(info["data_path"] / "testing_list.txt")
    with pytest.raises(DatasetNotFoundError, match="testing_list.txt' does not exist"):
        SpeechCommands(root=str(root), cache=False).setup("test")


def test_prepare_data_downloads_through_torchaudio_only_with_the_flag(tmp_path, monkeypatch):
    import torchaudio.datasets

    calls = []
    monkeypatch.setattr(torchaudio.datasets, "SPEECHCOMMANDS", lambda root, **kw: calls.append((root, kw)))
    write_speech_commands(tmp_path, words_per_class=1, extra_words=(), noise_seconds=(1.5,))
    SpeechCommands(root=str(tmp_path)).prepare_data()
    assert calls == []
    SpeechCommands(root=str(tmp_path), download=True).prepare_data()
    assert calls == [(str(tmp_path), {"download": True})]


def test_arguments_are_checked(speech):
    root, _ = speech
    with pytest.raises(ValueError, match="unknown_fraction"):
        SpeechCommands(root=str(root), unknown_fraction=1.5)
    with pytest.raises(ValueError, match="silence_per_split"):
        SpeechCommands(root=str(root), silence_per_split=-1)
    with pytest.raises(TypeError, match="batch_size"):
        SpeechCommands(root=str(root), batch_size=2.0)
    with pytest.raises(ValueError, match="unknown split"):
        SpeechCommands(root=str(root)).eval_dataset("dev")


# ------------------------------------------------------------------------------------------------ cache

def _no_wav_reads(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError(f"soundfile.read called: {args[0] if args else kwargs}")

    monkeypatch.setattr(soundfile, "read", fail)


def _cache_files(root) -> set[str]:
    return {n for n in os.listdir(root / "SpeechCommands") if n.startswith("advtrain_cache_")}


def test_cache_is_reused_without_reading_wav_files(speech, monkeypatch):
    root, _ = speech
    first = SpeechCommands(root=str(root))
    first.setup(None)
    files = _cache_files(root)
    assert len(files) == 3 and all(f.endswith(".pt") for f in files)
    assert {f.split("_")[2] for f in files} == set(SPLITS)
    _no_wav_reads(monkeypatch)
    second = SpeechCommands(root=str(root))
    second.setup(None)
    for split in SPLITS:
        a, b = first.eval_dataset(split), second.eval_dataset(split)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and b.x.dtype == torch.int16
    x, _ = second.on_after_batch_transfer(next(iter(second.train_dataloader())), 0)
    assert x.dtype == torch.float32
    assert _cache_files(root) == files
    # without the cache the files must be read: the patch really blocks reading
    with pytest.raises(AssertionError, match="soundfile.read called"):
        SpeechCommands(root=str(root), cache=False).setup("test")


def test_cache_is_rebuilt_when_a_setting_or_the_files_change(speech, monkeypatch):
    root, info = speech
    SpeechCommands(root=str(root)).setup("test")
    assert len(_cache_files(root)) == 1
    with monkeypatch.context() as patch:
        _no_wav_reads(patch)
        SpeechCommands(root=str(root)).setup("test")  # same settings: cached
        for changed in ({"unknown_fraction": 0.5}, {"silence_per_split": 2}, {"split_seed": 1}):
            with pytest.raises(AssertionError, match="soundfile.read called"):
                SpeechCommands(root=str(root), **changed).setup("test")
    changed = SpeechCommands(root=str(root), silence_per_split=2)
    changed.setup("test")
    assert int((changed.test_set.y == SILENCE).sum()) == 2
    assert len(_cache_files(root)) == 2
    # a new clip in the test list changes the listing: rebuilt, and the new clip is in
    write_speech_wav(info["data_path"] / "go" / "c0ffee11_nohash_9.wav", speech_clip(99, 16000))
    with open(info["data_path"] / "testing_list.txt", "a") as f:
        f.write("go/c0ffee11_nohash_9.wav\n")
    dm = SpeechCommands(root=str(root))
    dm.setup("test")
    assert 32 * 99 in dm.test_set.x[:, 0, 0].tolist()
    assert len(_cache_files(root)) == 3


def test_cache_false_writes_nothing(speech):
    root, _ = speech
    SpeechCommands(root=str(root), cache=False).setup(None)
    assert _cache_files(root) == set()


def test_corrupt_cache_is_rebuilt(speech):
    root, _ = speech
    SpeechCommands(root=str(root)).setup("validate")
    (path,) = [root / "SpeechCommands" / f for f in _cache_files(root)]
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        ds = SpeechCommands(root=str(root)).eval_dataset("val")
    assert len(ds) == 18
    assert len(torch.load(path, weights_only=True)["y"]) == 18  # rewritten


# ----------------------------------------------------------------------------------------- unknown clips

def test_unknown_fraction_keeps_a_seeded_subset(speech):
    root, info = speech
    all_unknown = {rel for rel, c in info["clips"].items() if c["split"] == "train" and c["label"] == UNKNOWN}
    assert len(all_unknown) == 6

    def kept(seed, fraction=0.5):
        ds = SpeechCommands(root=str(root), unknown_fraction=fraction, split_seed=seed, cache=False)
        rows = _word_rows(ds.eval_dataset("train"), info)
        words = {rel for rel, (_, label) in rows.items() if label != UNKNOWN}
        assert len(words) == 26  # command words are never dropped
        return frozenset(rel for rel, (_, label) in rows.items() if label == UNKNOWN)

    assert kept(0, 1.0) == all_unknown  # default: all of them
    assert kept(0, 0.0) == frozenset()
    subsets = [kept(seed) for seed in range(4)]
    assert all(len(s) == 3 and s <= all_unknown for s in subsets)
    assert kept(0) == subsets[0] and kept(3) == subsets[3]  # seeded: the same subset again
    assert len(set(subsets)) > 1  # and the seed matters
