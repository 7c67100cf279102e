"""CIFAR-100 from the original python-version pickles, read through an unpickler that only rebuilds arrays."""
from __future__ import annotations

import codecs
import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from mpbench.data.archives import Part
from mpbench.data.base import DatasetSource, ImageData, register_dataset


def _allowed() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: numpy array/scalar/dtype reconstruction, latin-1 byte strings."""
    core = importlib.import_module("numpy._core" if hasattr(np, "_core") else "numpy.core")
    multiarray, numeric = core.multiarray, core.numeric
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): codecs.encode}
    for package in ("numpy.core", "numpy._core"):  # pickles written by numpy 1.x and 2.x
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global (no code runs)."""

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if ArrayUnpickler._ALLOWED is None:
            ArrayUnpickler._ALLOWED = _allowed()
        try:
            return ArrayUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file") from None


def load_array_pickle(path: Path) -> Any:
    """Read a (Python 2 or 3) pickle of dicts, lists and numpy arrays; keys decode as latin-1 like torchvision."""
    return ArrayUnpickler(io.BytesIO(Path(path).read_bytes()), encoding="latin1").load()


@register_dataset("cifar100")
class Cifar100(DatasetSource):
    """CIFAR-100: 60,000 32x32 colour images of 100 classes (fine labels; 50,000 train / 10,000 test)."""

    citation = "Krizhevsky. Learning Multiple Layers of Features from Tiny Images. Tech. report, U. Toronto, 2009."
    display = "CIFAR-100"
    how_to_get = ("download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and run `mpbench data prepare "
                  "cifar100 --from cifar-100-python.tar.gz` (gives <data root>/cifar-100-python/{train,test})")
    num_classes, channels, image_size = 100, 3, 32
    default_image_size = 32
    sizes = {"train": 50000, "test": 10000}
    md5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}
    archive_md5 = {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}  # torchvision's value
    folder = "cifar-100-python"
    parts = (Part(folder, contains=("train", "test")),)

    def files(self, root: Path, split: str) -> list[Path]:
        return [root / self.folder / split]

    def read(self, root: Path, split: str) -> ImageData:
        entry = load_array_pickle(self.files(root, split)[0])
        data = np.asarray(entry["data"], dtype=np.uint8)  # (N, 3072): 1024 R, 1024 G, 1024 B, each row-major
        labels = np.asarray(entry["fine_labels"], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != data.shape[:1]:
            raise ValueError(f"data {data.shape} and labels {labels.shape} do not match CIFAR's layout")
        return ImageData.from_numpy(data.reshape(-1, 3, 32, 32), labels, self.num_classes)
