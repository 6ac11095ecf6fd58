"""ImageNet-100 datamodule on a tiny ImageNet-style folder of JPEGs written by the fixture.

Every fixture image encodes its class in the green channel (a constant ``GREEN[wnid]``) and has a red
gradient along x and a blue gradient along y, so crops and flips change the pixels while the class can
still be read from the mean of the green plane.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from advtrain.datamodules import DatasetNotFoundError, ImageNet100
from advtrain.datamodules.imagenet100 import CLASS_LIST_FILE, ClassListImageFolder, read_class_list

# Listed classes in deliberately unsorted order; sorted they are LISTED_SORTED -> labels 0..3.
LISTED = ["n03000000", "n01000000", "n04000000", "n02000000"]
LISTED_SORTED = sorted(LISTED)
# Not listed, sorts between listed ones: if it leaked in, labels 2 and 3 would shift.
UNLISTED = "n02500000"
GREEN = {wnid: 30 + 60 * k for k, wnid in enumerate(LISTED_SORTED)} | {UNLISTED: 250}
N_TRAIN, N_VAL = 3, 2  # images per class
SIZES = [(40, 50), (50, 40), (44, 44)]  # (width, height), cycled over the images of a class


def _image(wnid: str, i: int) -> Image.Image:
    w, h = SIZES[i % len(SIZES)]
    x = torch.arange(w).view(1, w).expand(h, w)
    y = torch.arange(h).view(h, 1).expand(h, w)
    rgb = torch.stack([(x * 255) // (w - 1), torch.full((h, w), GREEN[wnid]), (y * 255) // (h - 1)], dim=-1)
    return Image.fromarray(rgb.to(torch.uint8).numpy(), mode="RGB")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> tuple[Path, Path]:
    """(root, class_list file): root/{train,val}/<wnid>/*.JPEG for 4 listed and 1 unlisted class."""
    root = tmp_path_factory.mktemp("imagenet")
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for wnid in [*LISTED, UNLISTED]:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                _image(wnid, i).save(folder / f"{wnid}_{split}_{i}.JPEG", quality=95)
    class_list = root / "classes.txt"
    class_list.write_text("# four test classes\n\n" + "\n".join(f"{w}  # class" for w in LISTED) + "\n")
    return root, class_list


def _dm(imagenet, **kwargs) -> ImageNet100:
    root, class_list = imagenet
    kwargs = {"class_list": str(class_list), "batch_size": 5, "num_workers": 0, "pin_memory": False,
              "image_size": 32, "resize_size": 36} | kwargs
    return ImageNet100(root=str(root), **kwargs)


def _class_of(img: torch.Tensor) -> int:
    """The label the fixture encoded in an image's green plane (index into LISTED_SORTED)."""
    green = img[1].float().mean().item()
    k = round((green - 30) / 60)
    assert abs(green - (30 + 60 * k)) < 12, f"green mean {green} encodes no listed class"
    return k


# -------------------------------------------------------------------------------- classes and labels

def test_class_filtering_and_label_mapping(imagenet):
    dm = _dm(imagenet)
    dm.setup("fit")
    for ds, n in ((dm.train_set, N_TRAIN), (dm.test_set, N_VAL)):
        assert ds.classes == LISTED_SORTED
        assert ds.class_to_idx == {w: k for k, w in enumerate(LISTED_SORTED)}
        assert len(ds) == 4 * n
        assert not any(UNLISTED in path for path, _ in ds.samples)
        for path, label in ds.samples:  # each file's folder is the class of its label
            assert Path(path).parent.name == LISTED_SORTED[label]
    assert dm.num_classes == 4 and dm.input_shape == (3, 32, 32) and dm.name == "ImageNet-100"
    # the folder class on its own also sorts the list it is given
    folder = ClassListImageFolder(str(imagenet[0] / "val"), LISTED)
    assert folder.classes == LISTED_SORTED and sorted(set(folder.targets)) == [0, 1, 2, 3]
    assert all(Path(p).parent.name == LISTED_SORTED[y] for p, y in folder.samples)


def test_image_of_class_k_carries_label_k(imagenet):
    dm = _dm(imagenet)
    for split in ("val", "test"):
        ds = dm.eval_dataset(split)
        labels = []
        for i in range(len(ds)):
            img, label = ds[i]
            assert _class_of(img) == label
            labels.append(label)
        assert sorted(set(labels)) == [0, 1, 2, 3]


# -------------------------------------------------------------------------------------- transforms

def test_train_and_eval_transform_shapes_and_dtypes(imagenet):
    dm = _dm(imagenet)
    dm.setup(None)
    for ds in (dm.train_set, dm.test_set):
        for i in range(len(ds)):
            img, label = ds[i]
            assert type(img) is torch.Tensor and img.dtype == torch.uint8 and img.shape == (3, 32, 32)
            assert isinstance(label, int)
    # other sizes follow image_size
    big = _dm(imagenet, image_size=48, resize_size=56)
    assert big.input_shape == (3, 48, 48)
    assert big.eval_dataset("test")[0][0].shape == (3, 48, 48)


def test_eval_transform_is_resize_then_center_crop_and_deterministic(imagenet):
    dm = _dm(imagenet)
    ds = dm.eval_dataset("test")
    for i in range(len(ds)):
        path, _ = ds.samples[i]
        with Image.open(path) as f:
            raw = TF.pil_to_tensor(f.convert("RGB"))
        expected = TF.center_crop(TF.resize(raw, [36], antialias=True), [32, 32])
        first, second = ds[i][0], ds[i][0]
        assert torch.equal(first, second)
        assert torch.equal(first, expected)


def test_train_transform_is_random(imagenet):
    dm = _dm(imagenet)
    dm.setup("fit")
    torch.manual_seed(0)
    draws = [dm.train_set[0][0] for _ in range(12)]
    distinct = {bytes(d.numpy()) for d in draws}
    assert len(distinct) > 3
    # some draw is mirrored: the red gradient then falls from left to right
    assert any(d[0, :, 0].float().mean() > d[0, :, -1].float().mean() for d in draws)
    assert any(d[0, :, 0].float().mean() < d[0, :, -1].float().mean() for d in draws)
    # the crop keeps the class
    assert all(_class_of(d) == dm.train_set[0][1] for d in draws)


# ------------------------------------------------------------------------------------------- splits

def test_held_out_validation_split(imagenet):
    dm = _dm(imagenet, val_size=5, split_seed=0)
    dm.setup("fit")
    train_paths = [p for p, _ in dm.train_set.samples]
    val_paths = [p for p, _ in dm.val_set.samples]
    assert len(val_paths) == 5 and len(train_paths) == 4 * N_TRAIN - 5
    assert not set(train_paths) & set(val_paths)
    assert all("/train/" in p for p in val_paths)
    assert sorted(train_paths + val_paths) == sorted(p for p, _ in ClassListImageFolder(
        str(imagenet[0] / "train"), LISTED).samples)
    # labels travel with their files
    assert all(Path(p).parent.name == LISTED_SORTED[y] for p, y in dm.val_set.samples + dm.train_set.samples)
    # deterministic in split_seed, different for another seed
    again = _dm(imagenet, val_size=5, split_seed=0)
    again.setup("validate")
    assert [p for p, _ in again.val_set.samples] == val_paths
    other = _dm(imagenet, val_size=5, split_seed=1)
    assert [p for p, _ in other.eval_dataset("val").samples] != val_paths
    # validation uses the evaluation transform; test is still root/val
    val = dm.eval_dataset("val")
    assert torch.equal(val[0][0], val[0][0]) and val[0][0].shape == (3, 32, 32)
    assert all("/val/" in p for p, _ in dm.eval_dataset("test").samples)


def test_val_size_zero_validates_on_official_val(imagenet):
    dm = _dm(imagenet, val_size=0)
    assert dm.eval_dataset("val") is dm.eval_dataset("test")
    assert len(dm.eval_dataset("val")) == 4 * N_VAL
    dm.setup("fit")
    assert len(dm.train_set) == 4 * N_TRAIN
    assert sum(len(y) for _, y in dm.val_dataloader()) == 4 * N_VAL


def test_eval_datasets_hand_out_single_samples(imagenet):
    # callbacks/robustness.py takes __getitems__ as the sign of whole-batch datasets (no default collate);
    # a torch Subset has one, so the held-out split must not be a Subset
    dm = _dm(imagenet, val_size=3)
    for split in ("val", "test"):
        assert not hasattr(dm.eval_dataset(split), "__getitems__")


def test_val_size_too_large(imagenet):
    with pytest.raises(ValueError, match="val_size=12 must be smaller than the 12 training images"):
        _dm(imagenet, val_size=12).setup("fit")


# -------------------------------------------------------------------------------------- dataloaders

@pytest.mark.parametrize("num_workers", [0, 1])
def test_dataloaders(imagenet, num_workers):
    dm = _dm(imagenet, num_workers=num_workers, val_size=4)
    dm.setup(None)
    loaders = {"train": dm.train_dataloader(), "val": dm.val_dataloader(), "test": dm.test_dataloader()}
    sizes = {"train": 4 * N_TRAIN - 4, "val": 4, "test": 4 * N_VAL}
    for split, loader in loaders.items():
        assert isinstance(loader, DataLoader)
        assert loader.num_workers == num_workers and loader.persistent_workers == (num_workers > 0)
        n = 0
        for x, y in loader:
            assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and x.shape[0] <= 5
            assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
            assert [_class_of(img) for img in x] == y.tolist()
            n += len(y)
        assert n == sizes[split], split


def test_preprocess_and_batch_transfer(imagenet):
    dm = _dm(imagenet)
    x, y = next(iter(dm.test_dataloader()))
    for train in (False, True):
        xf, yf = dm.preprocess((x, y), train=train)
        assert xf.dtype == torch.float32 and xf.shape == x.shape
        assert 0.0 <= xf.min() and xf.max() <= 1.0 and xf.max() > 0.9
        assert torch.allclose(xf * 255, x.float()) and torch.equal(yf, y)
    xb, yb = dm.on_after_batch_transfer([x, y], 0)
    assert xb.dtype == torch.float32 and torch.allclose(xb * 255, x.float()) and torch.equal(yb, y)
    floats = torch.rand(2, 3, 4, 4)
    assert torch.equal(dm.preprocess((floats, y[:2]), train=False)[0], floats)


# ------------------------------------------------------------------------------------------- errors

def test_missing_listed_class_is_named(imagenet, tmp_path):
    root, _ = imagenet
    class_list = tmp_path / "more.txt"
    class_list.write_text("\n".join([*LISTED, "n09999999"]) + "\n")
    dm = _dm(imagenet, class_list=str(class_list))
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "n09999999" in message and "1 of the 5 classes" in message
    assert str(class_list) in message and str(root / "train") in message
    assert not any(w in message for w in LISTED)


def test_many_missing_classes_are_summarized(imagenet, tmp_path):
    class_list = tmp_path / "many.txt"
    missing = [f"n0999999{k}" for k in range(7)]
    class_list.write_text("\n".join([*LISTED, *missing]) + "\n")
    with pytest.raises(DatasetNotFoundError) as err:
        _dm(imagenet, class_list=str(class_list)).eval_dataset("test")
    message = str(err.value)
    assert "7 of the 11 classes" in message and "(2 more)" in message
    assert all(w in message for w in missing[:5]) and missing[5] not in message and missing[6] not in message


def test_missing_split_folder(tmp_path, imagenet):
    _, class_list = imagenet
    (tmp_path / "train").mkdir()
    dm = ImageNet100(root=str(tmp_path), class_list=str(class_list), num_workers=0, pin_memory=False)
    with pytest.raises(DatasetNotFoundError) as err:
        dm.setup("test")
    message = str(err.value)
    assert str(tmp_path / "val") in message and "cannot be downloaded automatically" in message
    assert "<root>/val/<wnid>/*.JPEG" in message


def test_missing_root_fails_at_construction(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(missing))) as err:
        ImageNet100(root=str(missing))
    assert "cannot be downloaded automatically" in str(err.value)


def test_empty_listed_class_folder(imagenet, tmp_path):
    root = tmp_path / "root"
    for wnid in LISTED:
        (root / "val" / wnid).mkdir(parents=True)
    _image(LISTED[0], 0).save(root / "val" / LISTED[0] / "a.JPEG")
    dm = ImageNet100(root=str(root), class_list=str(imagenet[1]), num_workers=0, pin_memory=False)
    with pytest.raises(DatasetNotFoundError, match=LISTED[1]):
        dm.eval_dataset("test")


@pytest.mark.parametrize(("kwargs", "error", "pattern"), [
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    ({"batch_size": 2.5}, TypeError, "batch_size must be an integer"),
    ({"eval_batch_size": 0}, ValueError, "eval_batch_size must be >= 1"),
    ({"val_size": -1}, ValueError, "val_size must be >= 0"),
    ({"split_seed": -1}, ValueError, "split_seed must be >= 0"),
    ({"num_workers": -1}, ValueError, "num_workers must be >= 0"),
    ({"image_size": 0}, ValueError, "image_size must be >= 1"),
    ({"image_size": 64, "resize_size": 48}, ValueError, "resize_size=48 must be >= data.image_size=64"),
])
def test_bad_arguments(imagenet, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        _dm(imagenet, **kwargs)


def test_class_list_parsing(imagenet, tmp_path):
    assert read_class_list(imagenet[1]) == LISTED  # comments and blank lines skipped, file order kept
    bad = tmp_path / "bad.txt"
    bad.write_text("n01000000\nn0100000x\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: .*'n0100000x'"):
        read_class_list(bad)
    bad.write_text("n01000000\n# again\nn01000000\n")
    with pytest.raises(ValueError, match="n01000000 is listed twice"):
        read_class_list(bad)
    bad.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="lists no wnids"):
        read_class_list(bad)
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        _dm(imagenet, class_list=str(tmp_path / "absent.txt"))


# ----------------------------------------------------------------------------------- bundled list

def test_bundled_class_list_is_cmc_imagenet100(tmp_path):
    wnids = read_class_list(CLASS_LIST_FILE)
    assert len(wnids) == 100 and len(set(wnids)) == 100
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    # first and last lines of HobbitLong/CMC imagenet100.txt
    assert wnids[0] == "n02869837" and wnids[-1] == "n02090622"
    dm = ImageNet100(root=str(tmp_path))  # class_list=None: the bundled file
    assert dm.num_classes == 100 and dm.input_shape == (3, 224, 224)
    assert dm.classes == sorted(wnids)
    assert dm.classes[:3] == ["n01558993", "n01692333", "n01729322"] and dm.classes[-1] == "n13040303"
