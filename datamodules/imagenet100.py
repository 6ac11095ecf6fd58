"""ImageNet-100: ImageNet's train/val folders restricted to a list of 100 classes, read as JPEG files.

Unlike the small in-memory datasets, ImageNet is decoded from files by PIL in DataLoader workers, which
also do the random resized crop and flip (one image at a time, on uint8 tensors). Batches reach the device
as uint8 (N, 3, H, W); :meth:`ImageNet100.preprocess` only scales them to [0, 1] there.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.vision import StandardTransform
from torchvision.transforms import v2

from .augment import to_unit_float
from .base import SplitDataModule, _check_int, check_loader_args
from .errors import DatasetNotFoundError, DatasetValueError

__all__ = ["CLASS_LIST_FILE", "ClassListImageFolder", "ImageNet100", "read_class_list"]

#: The bundled class list: the ImageNet-100 of Tian et al. (CMC), 100 wnids.
CLASS_LIST_FILE = Path(__file__).with_name("imagenet100_classes.txt")

_WNID = re.compile(r"n\d{8}")

_LAYOUT_HINT = (
    "ImageNet cannot be downloaded automatically (its license requires registering at image-net.org): "
    "download the ILSVRC2012 train and validation images yourself and lay them out as "
    "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (the validation images sorted into class "
    "folders, e.g. with the widely used valprep.sh), then point data.root (--data.root) at <root>."
)


def read_class_list(path: str | os.PathLike) -> list[str]:
    """The wnids in ``path``, one per line, in file order; ``#`` starts a comment, blank lines are skipped.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a line that is not a wnid
    (``n`` and eight digits), a repeated wnid, or a file without any wnid.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ImageNet-100 class list '{path}' does not exist; set data.class_list "
                                "(--data.class_list) to a text file with one wnid per line, or null for "
                                "the bundled CMC list.")
    wnids: list[str] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            if not _WNID.fullmatch(entry):
                raise ValueError(f"{path}:{lineno}: expected one ImageNet wnid per line (like n01440764), "
                                 f"got {entry!r}")
            if entry in seen:
                raise ValueError(f"{path}:{lineno}: wnid {entry} is listed twice (first on line {seen[entry]})")
            seen[entry] = lineno
            wnids.append(entry)
    if not wnids:
        raise ValueError(f"ImageNet-100 class list '{path}' lists no wnids")
    return wnids


class ClassListImageFolder(ImageFolder):
    """An :class:`~torchvision.datasets.ImageFolder` that sees only the folders named in ``classes``.

    Label ``k`` is the ``k``-th of ``classes`` in sorted order; folders not listed are ignored. A listed
    class without a folder raises :class:`DatasetNotFoundError` naming the missing wnids, the folder and
    ``source`` (where the list came from). Samples are ``(PIL image -> transform, int label)``.
    """

    def __init__(self, root: str, classes: Sequence[str], transform: Callable | None = None,
                 source: str = "the class list") -> None:
        # find_classes runs inside ImageFolder.__init__, so these must exist before it is called
        self.wanted = sorted(classes)
        self.source = source
        super().__init__(root, transform=transform)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        missing = [c for c in self.wanted if not os.path.isdir(os.path.join(directory, c))]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
            raise DatasetNotFoundError(
                f"ImageNet-100 not found: {len(missing)} of the {len(self.wanted)} classes listed in "
                f"'{self.source}' have no folder in '{os.fspath(directory)}': {shown}. Each listed wnid needs "
                f"a folder '{os.fspath(directory)}/<wnid>' of JPEG images; check data.root (--data.root), or "
                "point data.class_list (--data.class_list) at a list of the classes you have."
            )
        return list(self.wanted), {c: i for i, c in enumerate(self.wanted)}

    def restricted(self, indices: Sequence[int], transform: Callable | None) -> ClassListImageFolder:
        """A copy holding only the samples at ``indices`` (in that order), with ``transform``.

        The copy shares the scan of the folder (no second walk over the files). It is a plain
        ImageFolder, not a ``torch.utils.data.Subset``: Subset has ``__getitems__``, which callers take as
        a sign of datasets that return whole batches (see ``callbacks/robustness.py``).
        """
        new = copy.copy(self)
        new.samples = [self.samples[i] for i in indices]
        new.imgs = new.samples
        new.targets = [label for _, label in new.samples]
        new.transform = transform
        new.transforms = StandardTransform(transform, self.target_transform)
        return new


class ImageNet100(SplitDataModule):
    """ImageNet-100 from ImageNet's folders: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``.

    The classes are the wnids in ``class_list`` (default: the bundled ``imagenet100_classes.txt``, the
    100 classes of Tian et al., "Contrastive Multiview Coding", ECCV 2020, which NuAT and many robustness
    papers use). Labels follow the sorted wnids: label ``k`` is the ``k``-th wnid in sorted order, for the
    bundled list n01558993 -> 0, n01692333 -> 1, n01729322 -> 2, ..., n13037406 -> 98, n13040303 -> 99
    (not the file's order, and not the ImageNet-1k label). Folders of other classes are ignored.

    Splits: ``train`` is ``root/train`` restricted to the classes, less ``val_size`` images held out as
    the validation split (chosen by a permutation seeded with ``split_seed``, the same on every rank, and
    read with the evaluation transform). ``test`` is ``root/val``, the official validation set on which
    papers report. With ``val_size=0`` the validation split *is* ``root/val``: then 'val' == 'test', so
    checkpoint selection on validation accuracy peeks at the test set.

    Images are decoded by PIL (RGB) in the DataLoader workers and transformed with
    ``torchvision.transforms.v2`` into uint8 (3, image_size, image_size) tensors, not normalized (the
    network normalizes inside): training uses RandomResizedCrop(image_size) and a random horizontal flip,
    evaluation Resize(resize_size) (shorter side) and CenterCrop(image_size). On the device
    :meth:`preprocess` divides by 255; there is no device-side augmentation.

    When each hook runs:

    * ``__init__``: checks the arguments and reads the class list; a missing ``root`` folder raises
      :class:`DatasetNotFoundError` here, before any training starts.
    * ``setup(stage)`` (every rank): scans ``root/train`` for ``fit``/``validate`` (and holds out the
      validation split), ``root/val`` for ``test``/``predict`` (and for ``fit``/``validate`` when
      ``val_size=0``); ``None`` does both. A missing ``train``/``val`` folder or listed class raises
      :class:`DatasetNotFoundError`.
    * ``on_after_batch_transfer`` (on the device): :meth:`preprocess` scales the uint8 batch to [0, 1].

    Args:
        root: folder holding ImageNet's ``train`` and ``val`` class folders (there is no download).
        class_list: text file with one wnid per line (``#`` comments and blank lines allowed); None: the
            bundled CMC list.
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size per device; defaults to ``batch_size``.
        val_size: number of training images held out for validation (0: validate on ``root/val``).
        split_seed: seed of the train/validation permutation.
        num_workers: DataLoader worker processes that decode and augment (0: in the main process).
        pin_memory: pin host batches for faster, asynchronous copies to the GPU.
        image_size: side of the square crop fed to the network.
        resize_size: evaluation resizes the shorter side to this, then center-crops ``image_size``.
    """

    name: str = "ImageNet-100"
    num_classes: int = 100
    #: (C, H, W) of one input; set from ``image_size``.
    input_shape: tuple[int, int, int] = (3, 224, 224)

    def __init__(
        self,
        root: str = "data/imagenet",
        class_list: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_size: int = 0,
        split_seed: int = 0,
        num_workers: int = 8,
        pin_memory: bool = True,
        image_size: int = 224,
        resize_size: int = 256,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, eval_batch_size, split_seed, num_workers)
        _check_int("val_size", val_size, 0, "Set data.val_size to the number of training images to hold out "
                   "(0: validate on the official validation set, root/val).")
        _check_int("image_size", image_size, 1, "Set data.image_size to the side of the crop in pixels (224).")
        _check_int("resize_size", resize_size, 1,
                   "Set data.resize_size to the evaluation resize of the shorter side in pixels (256).")
        if resize_size < image_size:
            raise ValueError(f"data.resize_size={resize_size} must be >= data.image_size={image_size}: evaluation "
                             "resizes the shorter side to resize_size and then center-crops image_size.")
        self.root = os.fspath(root)
        self.class_list = os.fspath(class_list) if class_list is not None else str(CLASS_LIST_FILE)
        self.classes = sorted(read_class_list(self.class_list))
        self.num_classes = len(self.classes)
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self.image_size = image_size
        self.resize_size = resize_size
        self.input_shape = (3, image_size, image_size)
        self.train_transform = v2.Compose([
            v2.PILToTensor(),
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
        ])
        self.eval_transform = v2.Compose([
            v2.PILToTensor(),
            v2.Resize(resize_size, antialias=True),
            v2.CenterCrop(image_size),
        ])
        self.train_set: ClassListImageFolder | None = None
        self.val_set: ClassListImageFolder | None = None
        self.test_set: ClassListImageFolder | None = None
        if not os.path.isdir(self.root):
            raise DatasetNotFoundError(f"{self.name} not found: folder '{self.root}' does not exist. {_LAYOUT_HINT}")

    # ------------------------------------------------------------------------------------- lightning

    def setup(self, stage: str | None = None) -> None:
        """Scan the folders that ``stage`` needs; splits already loaded are kept."""
        if stage in (None, "fit", "validate"):
            if self.val_size == 0:
                if stage != "validate" and self.train_set is None:
                    self.train_set = self._folder("train", self.train_transform)
                self.val_set = self._test_split()
            elif self.train_set is None or self.val_set is None:
                full = self._folder("train", self.train_transform)
                if self.val_size >= len(full):
                    raise DatasetValueError(
                        f"data.val_size={self.val_size} must be smaller than the {len(full)} training images "
                        f"of {self.name} in '{full.root}'; lower data.val_size (--data.val_size)."
                    )
                perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.split_seed))
                # sorted indices keep the folder order inside each split (the train loader shuffles anyway)
                self.val_set = full.restricted(perm[: self.val_size].sort().values.tolist(), self.eval_transform)
                self.train_set = full.restricted(perm[self.val_size:].sort().values.tolist(), self.train_transform)
        if stage in (None, "test", "predict"):
            self._test_split()

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_dataset("val"), self.eval_batch_size, shuffle=False)

    # ---------------------------------------------------------------------------------------- public

    def eval_dataset(self, split: str) -> Dataset:
        """The ``"val"`` or ``"test"`` split with the evaluation transform (uint8 images, per sample).

        Scans the folder if ``setup`` has not yet done so. With ``val_size=0``, ``"val"`` is the same
        dataset as ``"test"`` (``root/val``). Batches from it still need :meth:`preprocess`.
        """
        if split == "val":
            if self.val_set is None:
                self.setup("validate")
            return self.val_set
        if split == "test":
            return self._test_split()
        raise ValueError(f"unknown split {split!r}: expected 'val' or 'test'")

    def preprocess(self, batch: tuple[Tensor, Tensor], train: bool) -> tuple[Tensor, Tensor]:
        """Turn a batch on the device into float32 images in [0, 1].

        uint8 images are divided by 255; floating images keep their values. ``train`` changes nothing:
        the training augmentation already happened in the DataLoader workers.
        """
        x, y = batch
        return to_unit_float(x), y

    # --------------------------------------------------------------------------------------- helpers

    def _folder(self, split: str, transform: Callable) -> ClassListImageFolder:
        folder = os.path.join(self.root, split)
        if not os.path.isdir(folder):
            raise DatasetNotFoundError(f"{self.name} not found: folder '{folder}' does not exist. {_LAYOUT_HINT}")
        try:
            return ClassListImageFolder(folder, self.classes, transform=transform, source=self.class_list)
        except DatasetNotFoundError:
            raise
        except FileNotFoundError as err:  # ImageFolder: a listed class folder without any image file
            raise DatasetNotFoundError(f"{self.name}: incomplete folder '{folder}' (classes from "
                                       f"'{self.class_list}'): {err}") from err

    def _test_split(self) -> ClassListImageFolder:
        if self.test_set is None:
            self.test_set = self._folder("val", self.eval_transform)
        return self.test_set

