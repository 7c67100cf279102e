"""scikit-learn's 8x8 handwritten digits (UCI optdigits test set), shipped inside the scikit-learn wheel."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mpbench.data.base import DatasetSource, ImageData, register_dataset, split_per_class


@register_dataset("digits")
class Digits(DatasetSource):
    """1,797 8x8 digits (scikit-learn); per class the first 80% (floor, file order) train, the rest test."""

    citation = ("Alpaydin, Kaynak. Optical Recognition of Handwritten Digits. UCI Machine Learning Repository, "
                "1998. (sklearn.datasets.load_digits)")
    how_to_get = "pip install scikit-learn (an mpbench dependency; the digits ship inside its wheel)"
    num_classes, channels, image_size = 10, 1, 8
    default_image_size = 16  # at the native 8 px the CIFAR-style networks score near chance
    sizes = {"train": 1433, "test": 364}
    builtin = True

    def read(self, root: Path, split: str) -> ImageData:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 17 gray levels 0..16 -> 0..255
        labels = bunch.target.astype(np.int64)
        keep = split_per_class(labels, self.num_classes, lambda counts: counts * 4 // 5, split)
        return ImageData.from_numpy(images[keep, None], labels[keep], self.num_classes)
