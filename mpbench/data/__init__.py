"""Datasets: registered sources of original files, decoded to uint8 tensors, with subsets and resizing.

s-CIFAR100 is ``load_dataset("cifar100", root, "train", per_class=50)`` (the first 50 training images of each
class); small SVHN is ``svhn`` with ``per_class=500``. Test splits stay full. ``held_out_per_class(data, 50, n)``
gives up to ``n`` further images per class, disjoint from that subset (MetaPerturb's validation set for its phi).
"""
from mpbench.data.base import DATASETS, SPLITS, DatasetSource, ImageData, register_dataset
from mpbench.data.load import clear_cache, default_data_root, load_dataset
from mpbench.data.ops import class_split, first_per_class, held_out_per_class, resize, select_classes, to_channels

__all__ = [
    "DATASETS", "SPLITS", "DatasetSource", "ImageData", "register_dataset", "load_dataset", "class_split",
    "default_data_root", "clear_cache", "select_classes", "first_per_class", "held_out_per_class", "to_channels",
    "resize",
]

# Built-in families, imported here so that registration (= table) order never depends on which module a caller
# imported first; the registry's loader adds plugins from the ``mpbench.datasets`` entry-point group.
from mpbench.data import (synthetic, sklearn_digits, mnist, cifar, svhn, stl10,  # noqa: E402,F401  isort: skip
                          tiny_imagenet, stanford_dogs, stanford_cars, fgvc_aircraft, cub200)
