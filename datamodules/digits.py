"""scikit-learn's bundled 8x8 handwritten digits: real data that ships with the package (no download)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import ArrayDataModule, _check_int
from .errors import DatasetValueError

__all__ = ["Digits"]

_TEST_SPLIT_SEED = 0  # fixed: the test set must not move when split_seed changes


class Digits(ArrayDataModule):
    """The 1797 8x8 grey-level digits of ``sklearn.datasets.load_digits`` (UCI optdigits test set).

    Pixels 0..16 become uint8 by ``round(v * 255 / 16)`` (round half to even), shape (1, 8, 8), 10
    classes. A fixed permutation (seed 0, independent of ``split_seed``) sets ``test_size`` examples apart
    as the test set; ``val_size`` of the rest are held out for validation as in every
    :class:`ArrayDataModule`. With the defaults: 1257 train, 180 validation, 360 test.

    ``root`` and ``download`` are accepted for a uniform interface and ignored.
    """

    name = "digits"
    num_classes = 10
    input_shape = (1, 8, 8)
    data_folder = None

    def __init__(self, batch_size: int = 64, val_size: int = 180, test_size: int = 360, **kwargs) -> None:
        """The arguments of :class:`ArrayDataModule` (smaller batches and validation set by default), and
        ``test_size``: the number of test examples."""
        super().__init__(batch_size=batch_size, val_size=val_size, **kwargs)
        _check_int("test_size", test_size, 1, "Set data.test_size to the number of test examples.")
        self.test_size = test_size
        self._splits: dict[bool, tuple[Tensor, Tensor]] | None = None

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        if self._splits is None:
            from sklearn.datasets import load_digits

            data = load_digits()
            x = torch.as_tensor(data.images, dtype=torch.float64).mul(255 / 16).round().to(torch.uint8)
            x = x.unsqueeze(1)
            y = torch.as_tensor(data.target, dtype=torch.int64)
            if self.test_size >= len(y):
                raise DatasetValueError(f"data.test_size={self.test_size} must be smaller than the {len(y)} "
                                        "digits; lower data.test_size.")
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(_TEST_SPLIT_SEED))
            test_idx = perm[: self.test_size].sort().values
            train_idx = perm[self.test_size:].sort().values
            self._splits = {True: (x[train_idx], y[train_idx]), False: (x[test_idx], y[test_idx])}
        return self._splits[train]
