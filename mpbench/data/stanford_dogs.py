"""Stanford Dogs (120 breeds) from the official ``images.tar`` and ``lists.tar``.

Labels and order come from ``train_list.mat`` / ``test_list.mat``: their ``file_list`` (paths under ``Images/``) in
file order and ``labels`` (1..120, minus 1). Stored at 84x84 (``mpbench.data.jpeg.FINE_GRAINED_STORED``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mpbench.data.archives import Part
from mpbench.data.base import register_dataset
from mpbench.data.jpeg import FINE_GRAINED_DEFAULT, FINE_GRAINED_STORED, JpegListDataset, mat_strings


@register_dataset("stanford_dogs")
class StanfordDogs(JpegListDataset):
    """Stanford Dogs: 20,580 colour photos of 120 dog breeds (12,000 train / 8,580 test), stored at 84x84."""

    citation = ("Khosla, Jayadevaprakash, Yao, Fei-Fei. Novel Dataset for Fine-Grained Image Categorization: "
                "Stanford Dogs. CVPR Workshop on Fine-Grained Visual Categorization, 2011.")
    display = "Stanford Dogs"
    how_to_get = ("download http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar and lists.tar and run "
                  "`mpbench data prepare stanford_dogs --from images.tar --from lists.tar` (places "
                  "<data root>/stanford_dogs/{Images/,train_list.mat,test_list.mat})")
    num_classes, image_size = 120, FINE_GRAINED_STORED
    default_image_size = FINE_GRAINED_DEFAULT
    sizes = {"train": 12000, "test": 8580}
    archive_md5 = {"images.tar": "1bb1f2a596ae7057f99d7d75860002ef", "lists.tar": "edbb9f16854ec66506b5f09b583e0656"}
    folder = "stanford_dogs"
    parts = (Part(f"{folder}/train_list.mat", name="train_list.mat"),
             Part(f"{folder}/test_list.mat", name="test_list.mat"),
             Part(f"{folder}/Images", name="Images"))

    def index_files(self, root: Path, split: str) -> list[Path]:
        return [Path(root) / self.folder / f"{split}_list.mat"]

    def samples(self, root: Path, split: str) -> tuple[list[Path], np.ndarray]:
        from scipy.io import loadmat

        mat = loadmat(self.index_files(root, split)[0], squeeze_me=True, variable_names=["file_list", "labels"])
        missing = [k for k in ("file_list", "labels") if k not in mat]
        if missing:
            raise ValueError(f"no {' or '.join(missing)} variable (the official lists have file_list and labels)")
        files = mat_strings(mat["file_list"])
        labels = np.atleast_1d(np.asarray(mat["labels"])).astype(np.int64).reshape(-1) - 1
        images = Path(root) / self.folder / "Images"
        return [images / f for f in files], labels
