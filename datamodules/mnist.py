"""MNIST through torchvision's reader (idx files in ``root/MNIST/raw``)."""

from __future__ import annotations

import torchvision
from torch import Tensor

from .base import ArrayDataModule, DatasetNotFoundError

__all__ = ["MNIST"]


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
        crop_padding: int = 0,
        flip: bool = False,
    ) -> None:
        super().__init__(root=root, download=download, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, val_size=val_size, split_seed=split_seed,
                         num_workers=num_workers, pin_memory=pin_memory, crop_padding=crop_padding,
                         flip=flip)

    def download_dataset(self) -> None:
        torchvision.datasets.MNIST(self.root, train=True, download=True)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        try:
            ds = torchvision.datasets.MNIST(self.root, train=train, download=False)
        except RuntimeError as err:
            if "not found" not in str(err):
                raise
            raise DatasetNotFoundError(self._not_found_message(
                f"no idx files in '{self.root}/{self.data_folder}' (torchvision: {err})")) from err
        return ds.data.unsqueeze(1).contiguous(), ds.targets.long()
