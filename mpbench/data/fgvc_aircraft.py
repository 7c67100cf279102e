"""FGVC-Aircraft (2013b, 100 variants) from the official ``fgvc-aircraft-2013b.tar.gz``.

Labels: the order of ``data/variants.txt``; splits: ``images_variant_trainval.txt`` (train) and
``images_variant_test.txt`` (test), in file order. Images are used whole, as torchvision's ``FGVCAircraft`` and
MetaPerturb's release do (the 20-pixel copyright banner at the bottom is not cropped). Stored at 84x84
(``mpbench.data.jpeg.FINE_GRAINED_STORED``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mpbench.data.archives import Part
from mpbench.data.base import register_dataset
from mpbench.data.jpeg import FINE_GRAINED_DEFAULT, FINE_GRAINED_STORED, JpegListDataset

LISTS = {"train": "images_variant_trainval.txt", "test": "images_variant_test.txt"}


@register_dataset("fgvc_aircraft")
class FGVCAircraft(JpegListDataset):
    """FGVC-Aircraft: 10,000 photos of 100 aircraft variants (6,667 trainval / 3,333 test), stored at 84x84."""

    citation = ("Maji, Rahtu, Kannala, Blaschko, Vedaldi. Fine-Grained Visual Classification of Aircraft. "
                "arXiv:1306.5151, 2013.")
    display = "FGVC Aircraft"
    how_to_get = ("download https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz "
                  "and run `mpbench data prepare fgvc_aircraft --from fgvc-aircraft-2013b.tar.gz` (places "
                  "<data root>/fgvc-aircraft-2013b/data)")
    num_classes, image_size = 100, FINE_GRAINED_STORED
    default_image_size = FINE_GRAINED_DEFAULT
    sizes = {"train": 6667, "test": 3333}
    folder = "fgvc-aircraft-2013b/data"
    parts = (Part(folder, contains=("variants.txt", *LISTS.values(), "images")),)

    def index_files(self, root: Path, split: str) -> list[Path]:
        base = Path(root) / self.folder
        return [base / "variants.txt", base / LISTS[split]]

    def samples(self, root: Path, split: str) -> tuple[list[Path], np.ndarray]:
        variants_file, list_file = self.index_files(root, split)
        variants = [line.strip() for line in variants_file.read_text().splitlines() if line.strip()]
        if len(variants) != self.num_classes or len(set(variants)) != len(variants):
            raise ValueError(f"variants.txt lists {len(set(variants))} distinct variants, expected {self.num_classes}")
        index = {v: k for k, v in enumerate(variants)}
        images = list_file.parent / "images"
        paths, labels = [], []
        for n, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant.strip() not in index:
                raise ValueError(f"{list_file.name} line {n}: variant {variant.strip()!r} is not in variants.txt")
            paths.append(images / f"{image_id}.jpg")
            labels.append(index[variant.strip()])
        return paths, np.asarray(labels, dtype=np.int64)
