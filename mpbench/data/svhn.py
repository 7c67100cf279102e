"""SVHN (cropped digits) from the original MATLAB files. Small SVHN is ``svhn`` with ``per_class=500``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mpbench.data.archives import Part
from mpbench.data.base import DatasetSource, ImageData, register_dataset


@register_dataset("svhn")
class SVHN(DatasetSource):
    """SVHN: 32x32 house-number digits, 10 classes (73,257 train / 26,032 test; label 10 means digit 0)."""

    citation = ("Netzer, Wang, Coates, Bissacco, Wu, Ng. Reading Digits in Natural Images with Unsupervised "
                "Feature Learning. NIPS Workshop on Deep Learning and Unsupervised Feature Learning, 2011.")
    display = "SVHN"
    how_to_get = ("download http://ufldl.stanford.edu/housenumbers/train_32x32.mat and test_32x32.mat and run "
                  "`mpbench data prepare svhn --from train_32x32.mat --from test_32x32.mat` (places them in "
                  "<data root>/svhn/)")
    num_classes, channels, image_size = 10, 3, 32
    default_image_size = 32
    sizes = {"train": 73257, "test": 26032}
    md5 = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373", "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}
    folder = "svhn"
    parts = (Part(f"{folder}/train_32x32.mat", name="train_32x32.mat"),
             Part(f"{folder}/test_32x32.mat", name="test_32x32.mat"))

    def files(self, root: Path, split: str) -> list[Path]:
        return [root / self.folder / f"{split}_32x32.mat"]

    def read(self, root: Path, split: str) -> ImageData:
        from scipy.io import loadmat

        mat = loadmat(self.files(root, split)[0], variable_names=["X", "y"])
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
            raise ValueError(f"X {x.shape} and y {y.shape} do not match SVHN's layout (32, 32, 3, N)")
        return ImageData.from_numpy(x.transpose(3, 2, 0, 1), y % 10, self.num_classes)  # X[h, w, c, n]
