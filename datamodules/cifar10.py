"""CIFAR-10 through torchvision's reader (python pickle batches in ``root/cifar-10-batches-py``)."""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor

from .base import ArrayDataModule, DatasetNotFoundError

__all__ = ["CIFAR10"]


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

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 1000,
        split_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
    ) -> None:
        super().__init__(root=root, download=download, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, val_size=val_size, split_seed=split_seed,
                         num_workers=num_workers, pin_memory=pin_memory, crop_padding=crop_padding,
                         flip=flip)

    def download_dataset(self) -> None:
        torchvision.datasets.CIFAR10(self.root, train=True, download=True)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        try:
            ds = torchvision.datasets.CIFAR10(self.root, train=train, download=False)
        except RuntimeError as err:
            if "not found" not in str(err):
                raise
            raise DatasetNotFoundError(self._not_found_message(
                f"missing or corrupted files in '{self.root}/{self.data_folder}' (torchvision: {err})"
            )) from err
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return x, torch.as_tensor(ds.targets, dtype=torch.int64)
