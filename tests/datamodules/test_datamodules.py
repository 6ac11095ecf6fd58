"""Datamodules: real torchvision readers on fixture files in the exact formats, splits, and augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_data import cifar10_files, mnist_images, write_mnist

from advtrain.datamodules import (
    CIFAR10,
    MNIST,
    ArrayDataModule,
    DatasetNotFoundError,
    DatasetValueError,
    Digits,
    TensorPairDataset,
)
from advtrain.datamodules.base import collate_batch


@pytest.fixture
def mnist_root(tmp_path):
    return tmp_path, write_mnist(tmp_path, n_train=60, n_test=20)


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    expected = cifar10_files(tmp_path, monkeypatch, n_per_batch=10, n_test=10)
    return tmp_path, expected


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(row.numpy()) for row in x.reshape(len(x), -1)}


# ---------------------------------------------------------------------------------- TensorPairDataset

def test_tensor_pair_dataset_returns_whole_batches():
    x = torch.arange(5 * 2 * 3, dtype=torch.uint8).reshape(5, 1, 2, 3)
    y = torch.arange(5) * 10
    ds = TensorPairDataset(x, y)
    assert len(ds) == 5
    xb, yb = ds.__getitems__([3, 0, 3])
    assert torch.equal(xb, x[[3, 0, 3]]) and torch.equal(yb, torch.tensor([30, 0, 30]))
    xi, yi = ds[2]
    assert torch.equal(xi, x[2]) and int(yi) == 20
    assert collate_batch((xb, yb)) == (xb, yb)
    assert pickle.loads(pickle.dumps(collate_batch)) is collate_batch  # usable by worker processes
    with pytest.raises(ValueError, match="same length"):
        TensorPairDataset(x, y[:4])


# ---------------------------------------------------------------------------------------------- MNIST

def test_mnist_reads_idx_files(mnist_root):
    root, expected = mnist_root
    dm = MNIST(root=str(root), val_size=10)
    dm.setup(None)
    assert (dm.num_classes, dm.input_shape) == (10, (1, 28, 28))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50, 10, 20)
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        assert ds.x.dtype == torch.uint8 and ds.x.shape[1:] == (1, 28, 28) and ds.y.dtype == torch.int64
    # The test set comes out in file order, pixel for pixel, with its labels.
    assert np.array_equal(dm.test_set.x[:, 0].numpy(), expected["x_test"])
    assert np.array_equal(dm.test_set.y.numpy(), expected["y_test"])
    # A specific training image: image 7 has pixel (r, c) = 4r + c + 7 and label 21 % 10.
    image7, label7 = mnist_images(7, 1)
    both = torch.cat([dm.train_set.x, dm.val_set.x])
    labels = torch.cat([dm.train_set.y, dm.val_set.y])
    where = [i for i in range(len(both)) if torch.equal(both[i, 0], torch.from_numpy(image7[0]))]
    assert len(where) == 1 and labels[where[0]] == int(label7[0]) == 1
    # Validation and training are disjoint and together are the training file.
    assert _rows(dm.train_set.x).isdisjoint(_rows(dm.val_set.x))
    assert _rows(both) == _rows(torch.from_numpy(expected["x_train"]).unsqueeze(1))
    pairs = sorted(zip(both[:, 0, 0, 0].tolist(), labels.tolist()))
    assert pairs == sorted(zip(expected["x_train"][:, 0, 0].tolist(), expected["y_train"].tolist()))


def test_split_is_deterministic_and_follows_split_seed(mnist_root):
    root, _ = mnist_root

    def val_ids(seed):
        dm = MNIST(root=str(root), val_size=10, split_seed=seed)
        dm.setup("fit")
        assert dm.test_set is None  # fit does not load the test split
        return dm.val_set.x[:, 0, 0, 0].tolist()  # pixel (0, 0) of image i is i

    assert val_ids(0) == val_ids(0)
    assert val_ids(3) == val_ids(3)
    assert set(val_ids(0)) != set(val_ids(3))


def test_setup_test_loads_only_the_test_split(mnist_root):
    root, _ = mnist_root
    dm = MNIST(root=str(root), val_size=10)
    dm.setup("test")
    assert dm.train_set is None and dm.val_set is None and len(dm.test_set) == 20


def test_val_size_must_leave_training_examples(mnist_root):
    root, _ = mnist_root
    with pytest.raises(ValueError, match="val_size=60 must be smaller than the 60 training examples"):
        MNIST(root=str(root), val_size=60).setup("fit")


# ------------------------------------------------------------------------------------------- CIFAR-10

def test_cifar10_reads_pickle_batches_in_nchw_order(cifar10_root):
    root, expected = cifar10_root
    dm = CIFAR10(root=str(root), val_size=10)
    dm.setup()
    assert (dm.num_classes, dm.input_shape, dm.crop_padding, dm.flip) == (10, (3, 32, 32), 4, True)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 10, 10)
    x = dm.test_set.x
    assert x.dtype == torch.uint8 and x.shape == (10, 3, 32, 32) and dm.test_set.y.dtype == torch.int64
    # Test image i (global index 50 + i): R plane = 50 + i, G row r = 100 + r, B column c = 200 + c.
    assert torch.equal(x[:, 0], torch.arange(50, 60, dtype=torch.uint8)[:, None, None].expand(10, 32, 32))
    assert torch.equal(x[:, 1], (100 + torch.arange(32, dtype=torch.uint8))[None, :, None].expand(10, 32, 32))
    assert torch.equal(x[:, 2], (200 + torch.arange(32, dtype=torch.uint8))[None, None, :].expand(10, 32, 32))
    assert np.array_equal(x.numpy(), expected["x_test"])
    assert dm.test_set.y.tolist() == [i % 10 for i in range(50, 60)]
    # The five training batches, split into disjoint train/val that together hold all 50 images.
    ids_train = dm.train_set.x[:, 0, 0, 0].tolist()
    ids_val = dm.val_set.x[:, 0, 0, 0].tolist()
    assert sorted(ids_train + ids_val) == list(range(50))
    assert dm.train_set.y.tolist() == [i % 10 for i in ids_train]
    assert dm.val_set.y.tolist() == [i % 10 for i in ids_val]


def test_cifar10_fixture_pickles_read_like_the_real_files(cifar10_root):
    root, expected = cifar10_root
    folder = root / "cifar-10-batches-py"
    with open(folder / "data_batch_3", "rb") as f:  # the dataset web page's recipe
        entry = pickle.load(f, encoding="bytes")
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (10, 3072)
    assert entry[b"labels"] == list(range(10))
    assert np.array_equal(entry[b"data"], expected["x_train"][20:30].reshape(10, 3072))
    assert entry[b"data"][0, :1024].tolist() == [20] * 1024  # R plane first
    with open(folder / "batches.meta", "rb") as f:
        assert pickle.load(f, encoding="latin1")["label_names"][0] == "airplane"


def test_cifar10_checks_md5(cifar10_root, monkeypatch):
    root, _ = cifar10_root
    monkeypatch.undo()  # real md5 sums: the fixture files must not pass as the real ones
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        CIFAR10(root=str(root)).setup("test")


# -------------------------------------------------------------------------------- missing dataset errors

@pytest.mark.parametrize("cls, folder", [(MNIST, "MNIST/raw"), (CIFAR10, "cifar-10-batches-py")])
def test_missing_root_fails_at_construction(tmp_path, cls, folder):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        cls(root=str(missing))
    message = str(info.value)
    assert f"'{missing}' does not exist" in message
    assert "data.root" in message and "data.download: true" in message and folder in message
    assert isinstance(info.value, FileNotFoundError)
    cls(root=str(missing), download=True)  # will be downloaded in prepare_data: no error yet


@pytest.mark.parametrize("cls", [MNIST, CIFAR10])
@pytest.mark.parametrize("stage", ["fit", "test"])
def test_empty_root_fails_at_setup(tmp_path, cls, stage):
    dm = cls(root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup(stage)
    message = str(info.value)
    assert str(tmp_path) in message and "data.root" in message and "data.download: true" in message


def test_download_flag_without_prepare_data_says_so(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="call prepare_data"):
        MNIST(root=str(tmp_path), download=True).setup("fit")


@pytest.mark.parametrize("cls, tv_name", [(MNIST, "MNIST"), (CIFAR10, "CIFAR10")])
def test_prepare_data_downloads_only_with_the_flag(tmp_path, monkeypatch, cls, tv_name):
    import torchvision

    calls = []
    monkeypatch.setattr(torchvision.datasets, tv_name, lambda root, **kw: calls.append((root, kw)))
    cls(root=str(tmp_path)).prepare_data()
    assert calls == []
    cls(root=str(tmp_path), download=True).prepare_data()
    assert calls == [(str(tmp_path), {"train": True, "download": True})]


# ---------------------------------------------------------------------------------------------- Digits

def test_digits_splits_and_pixels():
    from sklearn.datasets import load_digits

    dm = Digits()
    dm.setup()
    assert (dm.num_classes, dm.input_shape, dm.batch_size, dm.crop_padding, dm.flip) == (10, (1, 8, 8), 64, 0, False)
    sizes = (len(dm.train_set), len(dm.val_set), len(dm.test_set))
    assert sizes == (1257, 180, 360) and sum(sizes) == 1797
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        assert ds.x.dtype == torch.uint8 and ds.y.dtype == torch.int64
        assert set(ds.y.tolist()) == set(range(10))
    x_all = torch.cat([dm.train_set.x, dm.val_set.x, dm.test_set.x])
    assert int(x_all.min()) == 0 and int(x_all.max()) == 255
    # Every sklearn image appears with its label, scaled by 255/16.
    data = load_digits()
    scaled = np.round(data.images * 255 / 16).astype(np.uint8)
    ours = sorted(zip((bytes(r) for r in x_all.reshape(1797, -1).numpy()),
                      torch.cat([dm.train_set.y, dm.val_set.y, dm.test_set.y]).tolist()))
    theirs = sorted(zip((bytes(r) for r in scaled.reshape(1797, -1)), data.target.tolist()))
    assert ours == theirs


def test_digits_test_set_ignores_split_seed():
    a, b = Digits(split_seed=0), Digits(split_seed=1)
    a.setup()
    b.setup()
    assert torch.equal(a.test_set.x, b.test_set.x) and torch.equal(a.test_set.y, b.test_set.y)
    assert not torch.equal(a.val_set.x, b.val_set.x)
    c = Digits(test_size=100, val_size=50, root="/does/not/exist")  # root is ignored
    c.setup()
    assert (len(c.train_set), len(c.val_set), len(c.test_set)) == (1647, 50, 100)


# ------------------------------------------------------------------------------------------ dataloaders

def test_dataloaders_yield_batches_and_cover_the_data_once(mnist_root):
    root, _ = mnist_root
    dm = MNIST(root=str(root), val_size=10, batch_size=16, eval_batch_size=6)
    dm.setup()
    loader = dm.train_dataloader()
    assert loader.collate_fn is collate_batch and not loader.drop_last
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [16, 16, 16, 2]
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape[1:] == (1, 28, 28) and y.dtype == torch.int64
        assert y.shape == x.shape[:1]
    ids = torch.cat([x[:, 0, 0, 0] for x, _ in batches])
    assert sorted(ids.tolist()) == sorted(dm.train_set.x[:, 0, 0, 0].tolist())  # each example once
    assert ids.tolist() != dm.train_set.x[:, 0, 0, 0].tolist()  # shuffled
    for loader, ds, sizes in ((dm.val_dataloader(), dm.val_set, [6, 4]),
                              (dm.test_dataloader(), dm.test_set, [6, 6, 6, 2])):
        got = list(loader)
        assert [len(x) for x, _ in got] == sizes
        assert torch.equal(torch.cat([x for x, _ in got]), ds.x)  # in order, unshuffled
        assert torch.equal(torch.cat([y for _, y in got]), ds.y)


def test_dataloader_with_worker_processes():
    dm = Digits(num_workers=1, batch_size=500, pin_memory=False)
    loader = dm.test_dataloader()
    assert loader.persistent_workers and loader.num_workers == 1
    x = torch.cat([xb for xb, _ in loader])
    assert torch.equal(x, dm.test_set.x)
    assert not Digits().test_dataloader().persistent_workers


def test_eval_dataset_and_no_validation():
    dm = Digits()
    assert dm.eval_dataset("test") is dm.test_set and len(dm.test_set) == 360
    assert dm.eval_dataset("val") is dm.val_set and len(dm.val_set) == 180
    with pytest.raises(ValueError, match="'val' or 'test'"):
        dm.eval_dataset("train")
    none = Digits(val_size=0)
    none.setup("fit")
    assert none.val_dataloader() == []
    assert len(none.train_set) == 1437
    with pytest.raises(ValueError, match="val_size is 0"):
        none.eval_dataset("val")


# ------------------------------------------------------------------------------------------- preprocess

def _random_images(n=64, c=3, h=8, w=8, seed=0):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_eval_preprocess_scales_only():
    dm = ArrayDataModule(crop_padding=4, flip=True)
    x = _random_images()
    y = torch.arange(64)
    out, y_out = dm.preprocess((x, y), train=False)
    assert out.dtype == torch.float32 and torch.equal(out, x.float() / 255) and y_out is y
    xf = torch.rand(4, 3, 8, 8)
    assert torch.equal(dm.preprocess((xf, y[:4]), train=False)[0], xf)  # floats are not divided again


def test_train_preprocess_crops_and_flips_each_example():
    p = 4
    dm = ArrayDataModule(crop_padding=p, flip=True)
    x = _random_images()
    torch.manual_seed(0)
    out, _ = dm.preprocess((x, torch.zeros(64, dtype=torch.long)), train=True)
    assert out.shape == x.shape and out.dtype == torch.float32
    padded = F.pad(x, (p, p, p, p))
    found = []
    for i in range(len(x)):  # reference: every crop offset and flip of the zero-padded image
        matches = []
        for dy in range(2 * p + 1):
            for dx in range(2 * p + 1):
                crop = padded[i, :, dy:dy + 8, dx:dx + 8]
                for flipped in (False, True):
                    candidate = crop.flip(-1) if flipped else crop
                    if torch.equal(out[i], candidate.float() / 255):
                        matches.append((dy, dx, flipped))
        assert len(matches) == 1, f"example {i} is not a crop/flip of its padded input"
        found.append(matches[0])
    dys, dxs, flips = zip(*found)
    assert len(set(zip(dys, dxs))) > 20  # each example draws its own offset
    assert (min(dys), max(dys), min(dxs), max(dxs)) == (0, 2 * p, 0, 2 * p)  # the full range of offsets
    assert set(flips) == {False, True}


def test_flip_only_and_no_augmentation():
    x = _random_images()
    y = torch.zeros(64, dtype=torch.long)
    out, _ = ArrayDataModule(flip=True).preprocess((x, y), train=True)
    flipped = [torch.equal(out[i], x[i].flip(-1).float() / 255) for i in range(64)]
    same = [torch.equal(out[i], x[i].float() / 255) for i in range(64)]
    assert all(a != b for a, b in zip(flipped, same)) and 10 < sum(flipped) < 54
    plain = ArrayDataModule()
    assert torch.equal(plain.preprocess((x, y), train=True)[0], plain.preprocess((x, y), train=False)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_preprocess_on_gpu_does_not_sync():
    dm = ArrayDataModule(crop_padding=4, flip=True)
    x = _random_images(n=256, h=32, w=32).cuda()
    y = torch.zeros(256, dtype=torch.long, device="cuda")
    dm.preprocess((x, y), train=True)  # warm up
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = dm.preprocess((x, y), train=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and out.shape == x.shape


# ---------------------------------------------------------------------------------- argument validation

@pytest.mark.parametrize("kwargs, error, match", [
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    ({"batch_size": 1.5}, TypeError, "batch_size must be an integer"),
    ({"eval_batch_size": 0}, ValueError, "eval_batch_size must be >= 1"),
    ({"val_size": -1}, ValueError, "val_size must be >= 0"),
    ({"crop_padding": -2}, ValueError, "crop_padding must be >= 0"),
    ({"num_workers": -1}, ValueError, "num_workers must be >= 0"),
    ({"split_seed": "x"}, TypeError, "split_seed must be an integer"),
    ({"test_size": 0}, ValueError, "test_size must be >= 1"),
])
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Digits(**kwargs)


def test_digits_test_size_too_large():
    with pytest.raises(ValueError, match="test_size=1797 must be smaller"):
        Digits(test_size=1797).setup()


# ----------------------------------------------------------------------------------------- Lightning

class _Recorder:
    def __init__(self):
        self.train, self.val = [], []


def _fit(dm, recorder, num_sanity_val_steps=0):
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(64, 10)

        def training_step(self, batch, batch_idx):
            recorder.train.append(batch[0].clone())
            return F.cross_entropy(self.net(batch[0].flatten(1)), batch[1])

        def validation_step(self, batch, batch_idx):
            recorder.val.append(batch[0].clone())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=num_sanity_val_steps)
    trainer.fit(Tiny(), datamodule=dm)


def test_trainer_preprocesses_train_and_validation_batches():
    torch.manual_seed(0)
    dm = Digits(crop_padding=2, flip=True, batch_size=32, eval_batch_size=100)
    rec = _Recorder()
    _fit(dm, rec)
    assert len(rec.train) == 3 and len(rec.val) == 2
    for x in rec.train:
        assert x.dtype == torch.float32 and x.shape == (32, 1, 8, 8) and 0 <= x.min() and x.max() <= 1
    # Validation is scaled but never augmented.
    assert torch.equal(torch.cat(rec.val), dm.val_set.x.float() / 255)


def test_trainer_skips_validation_when_val_size_is_zero():
    rec = _Recorder()
    _fit(Digits(val_size=0), rec, num_sanity_val_steps=2)  # the sanity check is skipped too
    assert len(rec.train) == 3 and rec.val == []


# ------------------------------------------------------------------------------------------ held-out split
def test_first_per_class_holds_out_the_first_images_of_each_class_in_file_order(cifar10_root):
    """The official NuAT scripts walk the training set in order and hold out each class's first 100 images."""
    root, _ = cifar10_root
    dm = CIFAR10(root=str(root), val_size=10, val_split="first_per_class")
    dm.setup("fit")
    x, y = dm.load_split(train=True)  # the files' order
    expected = [next(i for i in range(len(y)) if y[i] == c) for c in range(10) if (y == c).any()]
    assert len(expected) == 10, "the fixture has every class"
    expected = sorted(expected)
    assert torch.equal(dm.val_set.y, y[expected]) and torch.equal(dm.val_set.x, x[expected])
    rest = [i for i in range(len(y)) if i not in expected]
    assert torch.equal(dm.train_set.y, y[rest]) and len(dm.train_set) + len(dm.val_set) == len(y)
    random = CIFAR10(root=str(root), val_size=10)
    random.setup("fit")
    assert not torch.equal(random.val_set.y, dm.val_set.y) or not torch.equal(random.val_set.x, dm.val_set.x)


def test_first_per_class_refuses_a_size_that_is_not_a_multiple_or_too_large(cifar10_root):
    root, _ = cifar10_root
    with pytest.raises(ValueError, match="multiple of the 10 classes"):
        CIFAR10(root=str(root), val_size=15, val_split="first_per_class")
    with pytest.raises(ValueError, match="val_split must be one of"):
        CIFAR10(root=str(root), val_split="first")
    _, y = Digits().load_split(train=True)  # classes of unequal sizes
    per_class = int(torch.bincount(y, minlength=10).min()) + 1  # one more than the rarest class has
    assert 10 * per_class < len(y)
    too_many = Digits(val_size=10 * per_class, val_split="first_per_class")
    with pytest.raises(DatasetValueError, match=f"fewer than the {per_class} training examples"):
        too_many.setup("fit")
