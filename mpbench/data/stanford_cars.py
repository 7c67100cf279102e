"""Stanford Cars (196 models) in torchvision's ``StanfordCars`` layout (the original host is gone).

``<data root>/stanford_cars/``: ``devkit/cars_train_annos.mat``, ``cars_test_annos_withlabels.mat``, ``cars_train/``
and ``cars_test/`` (the images of ``cars_train.tgz`` / ``cars_test.tgz``). Labels: each annotation's ``class``
(1..196) minus 1; order: the annotations' file order. Stored at 84x84 (``mpbench.data.jpeg.FINE_GRAINED_STORED``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mpbench.data.archives import Part
from mpbench.data.base import register_dataset
from mpbench.data.jpeg import FINE_GRAINED_DEFAULT, FINE_GRAINED_STORED, JpegListDataset, mat_strings


@register_dataset("stanford_cars")
class StanfordCars(JpegListDataset):
    """Stanford Cars: 16,185 colour photos of 196 car models (8,144 train / 8,041 test), stored at 84x84."""

    citation = ("Krause, Stark, Deng, Fei-Fei. 3D Object Representations for Fine-Grained Categorization. "
                "ICCV Workshop on 3D Representation and Recognition, 2013.")
    display = "Stanford Cars"
    how_to_get = ("the original host (ai.stanford.edu/~jkrause/cars) is gone: get car_devkit.tgz, cars_train.tgz, "
                  "cars_test.tgz and cars_test_annos_withlabels.mat from a mirror (the files torchvision's "
                  "StanfordCars reads) and run `mpbench data prepare stanford_cars --from car_devkit.tgz --from "
                  "cars_train.tgz --from cars_test.tgz --from cars_test_annos_withlabels.mat` (or --from a folder "
                  "holding them; places torchvision's layout in <data root>/stanford_cars)")
    num_classes, image_size = 196, FINE_GRAINED_STORED
    default_image_size = FINE_GRAINED_DEFAULT
    sizes = {"train": 8144, "test": 8041}
    md5 = {"cars_test_annos_withlabels.mat": "b0a2b23655a3edd16d84508592a98d10"}  # torchvision's values
    archive_md5 = {"car_devkit.tgz": "c3b158d763b6e2245038c8ad08e45376",
                   "cars_train.tgz": "065e5b463ae28d29e77c1b4b166cfe61",
                   "cars_test.tgz": "4ce7ebf6a94d07f1952d94dd34c4d501"}
    folder = "stanford_cars"
    parts = (Part(f"{folder}/cars_test_annos_withlabels.mat", name="cars_test_annos_withlabels.mat"),
             Part(f"{folder}/devkit", contains=("cars_train_annos.mat",)),
             Part(f"{folder}/cars_train", name="cars_train"),
             Part(f"{folder}/cars_test", name="cars_test"))

    def index_files(self, root: Path, split: str) -> list[Path]:
        base = Path(root) / self.folder
        return [base / "devkit" / "cars_train_annos.mat" if split == "train" else
                base / "cars_test_annos_withlabels.mat"]

    def samples(self, root: Path, split: str) -> tuple[list[Path], np.ndarray]:
        from scipy.io import loadmat

        mat = loadmat(self.index_files(root, split)[0], squeeze_me=True, variable_names=["annotations"])
        if "annotations" not in mat:
            raise ValueError("no annotations variable (the devkit's struct array of bbox_*, class, fname)")
        ann = np.atleast_1d(mat["annotations"])
        fields = ann.dtype.names or ()
        name_field = next((f for f in ("fname", "relative_im_path") if f in fields), None)
        if name_field is None or "class" not in fields:
            raise ValueError(f"annotations have fields {', '.join(fields) or 'none'}; expected class and fname")
        base = Path(root) / self.folder
        images = base / f"cars_{split}"
        names = mat_strings(ann[name_field])
        # fname is relative to cars_<split>/; relative_im_path (cars_annos.mat) to the dataset folder
        paths = [images / n for n in names] if name_field == "fname" else [base / n for n in names]
        labels = np.asarray([int(np.asarray(c).reshape(-1)[0]) for c in ann["class"]], dtype=np.int64) - 1
        return paths, labels
