"""STL-10's labelled splits from the original binary files (the unlabelled split is not used)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mpbench.data.archives import Part
from mpbench.data.base import DatasetSource, ImageData, register_dataset


@register_dataset("stl10")
class STL10(DatasetSource):
    """STL-10: 96x96 colour images of 10 classes (5,000 train / 8,000 test)."""

    citation = ("Coates, Ng, Lee. An Analysis of Single-Layer Networks in Unsupervised Feature Learning. "
                "AISTATS, 2011.")
    display = "STL10"
    how_to_get = ("download http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz and run `mpbench data "
                  "prepare stl10 --from stl10_binary.tar.gz` (gives <data root>/stl10_binary/)")
    num_classes, channels, image_size = 10, 3, 96
    default_image_size = 32  # the paper trains its STL-10 target at 32 px
    sizes = {"train": 5000, "test": 8000}
    md5 = {"train_X.bin": "918c2871b30a85fa023e0c44e0bee87f", "train_y.bin": "5a34089d4802c674881badbb80307741",
           "test_X.bin": "7f263ba9f9e0b06b93213547f721ac82", "test_y.bin": "36f9794fa4beb8a2c72628de14fa638e"}
    archive_md5 = {"stl10_binary.tar.gz": "91f7769df0f17e558f3565bffb0c7dfb"}  # torchvision's value
    folder = "stl10_binary"
    parts = (Part(folder, contains=("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")),)

    def files(self, root: Path, split: str) -> list[Path]:
        return [root / self.folder / f"{split}_X.bin", root / self.folder / f"{split}_y.bin"]

    def read(self, root: Path, split: str) -> ImageData:
        x_path, y_path = self.files(root, split)
        x = np.fromfile(x_path, dtype=np.uint8)
        y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
        per_image = 3 * 96 * 96
        if x.size % per_image or x.size // per_image != y.size:
            raise ValueError(f"{x.size} image bytes do not hold {y.size} images of 3x96x96")
        if y.size and not (1 <= y.min() and y.max() <= 10):
            raise ValueError(f"labels outside 1..10 in {y_path.name}")
        images = x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)  # each channel is stored column-major
        return ImageData.from_numpy(images, y - 1, self.num_classes)
