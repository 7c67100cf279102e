"""The dataset plugin interface: a ``DatasetSource`` decodes one dataset's original files into uint8 tensors.

A dataset is one class in a family module (``mpbench/data/<family>.py``) decorated with
``@register_dataset("<name>")``. It implements ``read`` (and ``files`` if it reads files under the data root);
``load``, ``prepare`` and ``verify`` turn missing or unreadable files into a one-line ``DataMissingError``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence

import numpy as np
import torch

from mpbench.errors import DataMissingError, MpbenchError, UsageError
from mpbench.registry import Registry, import_plugins

if TYPE_CHECKING:
    from mpbench.data.archives import Part

SPLITS = ("train", "test")
FAMILIES = ("synthetic", "sklearn_digits", "mnist", "cifar", "svhn", "stl10",  # registration = table order
            "tiny_imagenet", "stanford_dogs", "stanford_cars", "fgvc_aircraft", "cub200")


def _load_families() -> None:
    import_plugins((f"mpbench.data.{family}" for family in FAMILIES), group="mpbench.datasets")


DATASETS: Registry[type["DatasetSource"]] = Registry("dataset", loader=_load_families)


def register_dataset(name: str, description: str = "") -> Callable[[type], type]:
    """Class decorator: ``@register_dataset("cifar100")``. The first docstring line is the default description."""

    def deco(cls: type) -> type:
        cls.name = name
        doc = (cls.__doc__ or "").strip().splitlines()
        cls.description = description or (doc[0] if doc else "")
        return DATASETS.register(name, description=cls.description, citation=cls.citation)(cls)

    return deco


@dataclass
class ImageData:
    """Images as uint8 ``(N, C, H, W)``, labels as int64 ``(N,)`` in ``0..num_classes-1``."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: np.ndarray, num_classes: int) -> "ImageData":
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if not images.flags.writeable:  # np.frombuffer over bytes; torch wants writable memory
            images = images.copy()
        return cls(torch.from_numpy(images), torch.from_numpy(np.asarray(labels, dtype=np.int64).copy()), num_classes)


class DatasetSource:
    """One dataset. Subclasses set the class attributes and implement ``read`` (and ``files``)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    display: ClassVar[str] = ""  # how tables name it ("Stanford Dogs"); "" = its registry name
    how_to_get: ClassVar[str] = ""  # one line: the exact command or placement that provides the files
    num_classes: ClassVar[int]
    channels: ClassVar[int]
    image_size: ClassVar[int]  # the size ``read`` returns (native, or the stored size of decoded JPEG sets)
    # the size CIFAR-style networks should see when a suite leaves ``data.image_size`` unset (None: image_size)
    default_image_size: ClassVar[int | None] = None
    sizes: ClassVar[dict[str, int]] = {}  # images per split, checked by ``verify``
    md5: ClassVar[dict[str, str]] = {}  # published checksums of fixed files, by file name (torchvision's values)
    archive_md5: ClassVar[dict[str, str]] = {}  # published checksums of the archives ``prepare --from`` accepts
    parts: ClassVar[tuple["Part", ...]] = ()  # where ``prepare --from`` finds each piece of the layout
    verify_classes: ClassVar[bool] = False  # ``verify`` also checks every class has an image in each split
    builtin: ClassVar[bool] = False  # True when the data ships with a Python package (no files under root)

    def files(self, root: Path, split: str) -> list[Path]:
        """The files ``read`` needs for a split (none for built-in data)."""
        return []

    def read(self, root: Path, split: str) -> ImageData:
        """Decode a split; called only once its files exist."""
        raise NotImplementedError

    # -- public API -------------------------------------------------------------------------------------------
    def load(self, root: Path, split: str) -> ImageData:
        """Decode ``split``; ``DataMissingError`` when a file is missing or cannot be parsed."""
        paths = self.require(Path(root), split)
        try:
            return self.read(Path(root), split)
        except MpbenchError:
            raise
        except Exception as e:  # any parse failure of a foreign file: report it on one line
            where = ", ".join(str(p) for p in paths) or "built-in data"
            raise self.error(f"cannot parse {where} ({type(e).__name__}: {e})", root) from e

    def prepare(self, root: Path, sources: Sequence[Path] = ()) -> str:
        """Make the files available offline: import ``sources`` (archives, folders or files the user downloaded,
        ``mpbench data prepare NAME --from PATH``) into the layout under ``root`` and verify them; without
        sources only check that the files are in place (the error says what to fetch)."""
        root = Path(root)
        if self.builtin:
            if sources:
                raise UsageError(f"{self.name}: --from is not supported for datasets that ship with a Python "
                                 f"package (nothing to import: {self.how_to_get}); run `mpbench data prepare "
                                 f"{self.name}` without --from")
            return f"{self.name}: built in, nothing to prepare"
        if sources:
            from mpbench.data.archives import import_sources

            placed = import_sources(self, root, [Path(s) for s in sources])
            return f"{self.name}: {placed}; {self.verify(root)}"
        for split in SPLITS:
            self.require(root, split)
        return f"{self.name}: files present under {root}"

    def verify(self, root: Path) -> str:
        """Check files are present, match published checksums and decode to the expected counts and shapes."""
        root = Path(root)
        parts, checked = [], 0
        for split in SPLITS:
            for path in self.require(root, split):
                if path.name in self.md5:
                    digest, want = md5sum(path), self.md5[path.name]
                    if digest != want:
                        raise self.error(f"{path} is corrupt (md5 {digest}, expected {want})", root)
                    checked += 1
            data = self.load(root, split)
            shape = (self.channels, self.image_size, self.image_size)
            if data.images.dtype != torch.uint8 or tuple(data.images.shape[1:]) != shape:
                got = "x".join(map(str, data.images.shape[1:]))
                raise self.error(f"{split} images are {data.images.dtype} {got}, expected uint8 "
                                 f"{'x'.join(map(str, shape))}", root)
            count = self.sizes.get(split)
            if count is not None and len(data) != count:
                raise self.error(f"{split} has {len(data)} images, expected {count}", root)
            if len(data) and not 0 <= int(data.labels.min()) <= int(data.labels.max()) < self.num_classes:
                raise self.error(f"{split} labels fall outside 0..{self.num_classes - 1}", root)
            if self.verify_classes:
                counts = np.bincount(data.labels.numpy(), minlength=self.num_classes)
                empty = np.flatnonzero(counts == 0)
                if empty.size:
                    more = f" (and {empty.size - 1} more)" if empty.size > 1 else ""
                    raise self.error(f"class {int(empty[0])}{more} has no {split} images (each of the "
                                     f"{self.num_classes} classes needs at least one)", root)
                parts.append(f"{split} {len(data)} ({int(counts.min())}-{int(counts.max())} per class)")
            else:
                parts.append(f"{split} {len(data)}")
        where = "built in" if self.builtin else f"under {root}"
        md5 = f", {checked} md5 ok" if checked else ""
        return (f"{self.name}: ok, {' + '.join(parts)} images of {self.channels}x{self.image_size}x{self.image_size}, "
                f"{self.num_classes} classes{md5} ({where})")

    # -- helpers for subclasses -------------------------------------------------------------------------------
    def error(self, what: str, root: Path | None = None) -> DataMissingError:
        """A one-line ``DataMissingError`` naming the dataset, the problem and how to get the data."""
        how = self.how_to_get.replace("<data root>", str(root)) if root is not None else self.how_to_get
        return DataMissingError(" ".join(f"dataset {self.name!r}: {what}; to get it: {how}".split()))

    def require(self, root: Path, split: str) -> list[Path]:
        """The split's files, raising when one is missing."""
        check_split(split)
        paths = self.files(Path(root), split)
        missing = [p for p in paths if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise self.error(f"missing {missing[0]}{more}", root)
        return paths


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: valid: {', '.join(SPLITS)}")


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def class_ranks(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Position of each sample among the samples of its class, in file order (0 for the first of each class)."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=num_classes)
    starts = np.cumsum(counts) - counts
    ranks = np.empty_like(labels)
    ranks[order] = np.arange(labels.size) - starts[labels[order]]
    return ranks


def split_per_class(labels: np.ndarray, num_classes: int, n_train: Callable[[np.ndarray], np.ndarray],
                    split: str) -> np.ndarray:
    """Boolean mask of a deterministic split: per class the first ``n_train(class_counts)[c]`` samples train."""
    labels = np.asarray(labels, dtype=np.int64)
    cut = np.asarray(n_train(np.bincount(labels, minlength=num_classes)))
    train = class_ranks(labels, num_classes) < cut[labels]
    return train if split == "train" else ~train
