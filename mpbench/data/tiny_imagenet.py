"""Tiny ImageNet (200 classes at 64x64): MetaPerturb's source dataset, from the official ``tiny-imagenet-200.zip``.

Classes are numbered in the order of ``wnids.txt``. Train: for each class in that order its
``train/<wnid>/images/*.JPEG`` by image number (``<wnid>_0``, ``<wnid>_1``, ..., ``<wnid>_499``), so class ``k``
holds images ``500k .. 500k+499`` as in the release's split files. Test: the 10,000 labelled validation images in
the order of ``val/val_annotations.txt`` (the official test split has no labels).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mpbench.data.archives import Part
from mpbench.data.base import register_dataset
from mpbench.data.jpeg import JpegListDataset, natural_key

IMAGE_SUFFIXES = (".jpeg", ".jpg")


def read_wnids(path: Path) -> list[str]:
    wnids = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{Path(path).name} lists a class twice")
    return wnids


@register_dataset("tiny_imagenet")
class TinyImageNet(JpegListDataset):
    """Tiny ImageNet: 64x64 colour images of 200 ImageNet classes (100,000 train / 10,000 val used as test)."""

    citation = "Le, Yang. Tiny ImageNet Visual Recognition Challenge. CS231N course report, Stanford, 2015."
    display = "Tiny ImageNet"
    how_to_get = ("download http://cs231n.stanford.edu/tiny-imagenet-200.zip and run `mpbench data prepare "
                  "tiny_imagenet --from tiny-imagenet-200.zip` (extracts it into <data root>/tiny-imagenet-200)")
    num_classes, image_size = 200, 64  # stored at the native size
    default_image_size = 32  # the paper meta-trains its source at 32 px
    sizes = {"train": 100000, "test": 10000}
    archive_md5 = {"tiny-imagenet-200.zip": "90528d7ca1a48142e341f4ef8d21d0de"}
    folder = "tiny-imagenet-200"
    parts = (Part(folder, contains=("wnids.txt", "train", "val/val_annotations.txt")),)

    def index_files(self, root: Path, split: str) -> list[Path]:
        base = Path(root) / self.folder
        return [base / "wnids.txt"] + ([base / "val" / "val_annotations.txt"] if split == "test" else [])

    def samples(self, root: Path, split: str) -> tuple[list[Path], np.ndarray]:
        base = Path(root) / self.folder
        wnids = read_wnids(base / "wnids.txt")
        if len(wnids) != self.num_classes:
            raise ValueError(f"wnids.txt lists {len(wnids)} classes, expected {self.num_classes}")
        paths: list[Path] = []
        labels: list[int] = []
        if split == "train":
            for k, wnid in enumerate(wnids):
                folder = base / "train" / wnid / "images"
                if not folder.is_dir():
                    raise self.error(f"missing {folder}", root)
                names = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES)),
                               key=natural_key)
                paths += [folder / n for n in names]
                labels += [k] * len(names)
            return paths, np.asarray(labels, dtype=np.int64)
        index = {w: k for k, w in enumerate(wnids)}
        for n, line in enumerate((base / "val" / "val_annotations.txt").read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            if len(fields) < 2 or fields[1].strip() not in index:
                raise ValueError(f"val_annotations.txt line {n}: expected '<file>\\t<wnid listed in wnids.txt>'")
            paths.append(base / "val" / "images" / fields[0].strip())
            labels.append(index[fields[1].strip()])
        return paths, np.asarray(labels, dtype=np.int64)
