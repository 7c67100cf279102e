"""Caltech-UCSD Birds-200-2011 (200 species) from the official ``CUB_200_2011.tgz``.

Order: ``images.txt``; labels: ``image_class_labels.txt`` (1..200, minus 1); split: ``train_test_split.txt``
(1 = train). Images are used whole (no bounding-box crop). Stored at 84x84 (``mpbench.data.jpeg.FINE_GRAINED_STORED``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mpbench.data.archives import Part
from mpbench.data.base import register_dataset
from mpbench.data.jpeg import FINE_GRAINED_DEFAULT, FINE_GRAINED_STORED, JpegListDataset

INDEX = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


def _id_table(path: Path) -> dict[int, str]:
    table: dict[int, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not key.isdigit() or not value.strip():
            raise ValueError(f"{path.name} line {n}: expected '<image id> <value>'")
        table[int(key)] = value.strip()
    return table


@register_dataset("cub200")
class CUB200(JpegListDataset):
    """CUB-200-2011: 11,788 photos of 200 bird species (5,994 train / 5,794 test), stored at 84x84."""

    citation = ("Wah, Branson, Welinder, Perona, Belongie. The Caltech-UCSD Birds-200-2011 Dataset. Tech. report "
                "CNS-TR-2011-001, Caltech, 2011.")
    display = "CUB"
    how_to_get = ("download https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz and run `mpbench "
                  "data prepare cub200 --from CUB_200_2011.tgz` (extracts it into <data root>/CUB_200_2011)")
    num_classes, image_size = 200, FINE_GRAINED_STORED
    default_image_size = FINE_GRAINED_DEFAULT
    sizes = {"train": 5994, "test": 5794}
    archive_md5 = {"CUB_200_2011.tgz": "97eceeb196236b17998738112f37df78"}
    folder = "CUB_200_2011"
    parts = (Part(folder, contains=(*INDEX, "images")),)

    def index_files(self, root: Path, split: str) -> list[Path]:
        return [Path(root) / self.folder / name for name in INDEX]

    def samples(self, root: Path, split: str) -> tuple[list[Path], np.ndarray]:
        images_file, labels_file, split_file = self.index_files(root, split)
        images, classes, is_train = _id_table(images_file), _id_table(labels_file), _id_table(split_file)
        lacking = next((i for i in images if i not in classes or i not in is_train), None)
        if lacking is not None:
            raise ValueError(f"image id {lacking} has no class or no split in {labels_file.name} / {split_file.name}")
        want = "1" if split == "train" else "0"
        ids = [i for i in images if is_train[i] == want]  # images.txt order (dicts keep insertion order)
        folder = images_file.parent / "images"
        return [folder / images[i] for i in ids], np.asarray([int(classes[i]) for i in ids], dtype=np.int64) - 1
