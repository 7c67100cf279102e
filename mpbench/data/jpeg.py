"""Datasets of JPEG files named by an official list: decoded once, resized to a stored size, cached as ``.npy``.

A subclass says which index files a split needs (``index_files``) and parses them into the split's image paths and
labels in the list's file order (``samples``). Every image is decoded with PIL, converted to RGB (grayscale and
CMYK files exist in these sets) and resized to ``image_size`` x ``image_size`` (the *stored size*) with
``Resize((s, s))`` semantics: bilinear with antialiasing, exactly ``torchvision.transforms.Resize`` on a PIL image.
``load_dataset`` then applies the run's ``data.image_size`` to the stored images.

The decoded split is cached under ``<data root>/cache/<dataset>/<split>-<size>-<key>.npy`` (uint8, N x 3 x s x s)
with ``<split>-<size>-<key>.labels.npy`` (int64) beside it; ``key`` hashes the decoder, the stored size and, for
every image and index file, its path under the data root, size and mtime. Changing, adding or removing a file
changes the key (the split is decoded again; caches of older keys are removed). Both files are written atomically
and read with ``allow_pickle=False``. Decoding writes into one preallocated array (the bytes of the cache file),
a chunk of images per thread, so a split is held once in memory.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from mpbench.data.base import SPLITS, DatasetSource, ImageData, check_split
from mpbench.errors import MpbenchError

DECODER = "pil-rgb-resize-bilinear-v1"  # part of the cache key: change it when decoding changes
CHUNK = 64          # images per decode task
MAX_THREADS = 8
ANNOUNCE = 5000     # decoding at least this many images prints one line to stderr (it takes a while)

# The fine-grained targets (Dogs, Cars, Aircraft, CUB) are stored at 84x84, MetaPerturb's size for them: the
# release keeps them as 84x84 arrays and resizes those to the run's size, so ``data.image_size=84`` (the default)
# is used as stored, with no second resampling, and 32 is one antialiased resize of the 84 px image, as there.
FINE_GRAINED_STORED = 84
FINE_GRAINED_DEFAULT = 84


def decode_image(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 ``(size, size, 3)``: PIL decode, ``convert("RGB")``, ``resize((size, size),
    BILINEAR)`` (what torchvision's ``default_loader`` then ``Resize((size, size))`` compute)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def mat_strings(value) -> list[str]:
    """A MATLAB cell array of strings as ``loadmat(squeeze_me=True)`` returns it (one string when it has one)."""
    return [str(np.asarray(v).reshape(-1)[0]) if np.ndim(v) else str(v) for v in np.atleast_1d(value).reshape(-1)]


def natural_key(name: str) -> list:
    """Sort key treating digit runs as numbers (``n01_2.JPEG`` before ``n01_10.JPEG``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def decode_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


def _npy_buffer(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 buffer holding a complete ``.npy`` file of ``shape`` and the array view into its data part."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.dtype(np.uint8).str, "fortran_order": False,
                                                  "shape": tuple(int(s) for s in shape)})
    head = header.getvalue()
    buf = np.empty(len(head) + int(np.prod(shape)), dtype=np.uint8)
    buf[:len(head)] = np.frombuffer(head, dtype=np.uint8)
    return buf, buf[len(head):].reshape(shape)


class JpegListDataset(DatasetSource):
    """Base class: RGB images decoded from JPEG files listed by the dataset's official index files."""

    channels = 3
    verify_classes = True
    image_size: ClassVar[int]  # the stored size

    # -- to implement -----------------------------------------------------------------------------------------
    def index_files(self, root: Path, split: str) -> list[Path]:
        """The list/annotation files that name a split's images (checked before they are parsed)."""
        raise NotImplementedError

    def samples(self, root: Path, split: str) -> tuple[list[Path], np.ndarray]:
        """The split's image paths and labels (``0..num_classes-1``) in the official list's order; raise
        ``ValueError`` (or a ``DataMissingError``) when an index file does not parse."""
        raise NotImplementedError

    # -- DatasetSource ----------------------------------------------------------------------------------------
    def _samples(self, root: Path, split: str) -> tuple[list[Path], np.ndarray]:
        memo = self.__dict__.setdefault("_memo", {})
        key = (str(root), split)
        if key not in memo:
            try:
                paths, labels = self.samples(Path(root), split)
            except MpbenchError:
                raise
            except Exception as e:
                where = ", ".join(str(p) for p in self.index_files(Path(root), split))
                raise self.error(f"cannot parse {where} ({type(e).__name__}: {e})", root) from e
            labels = np.asarray(labels, dtype=np.int64)
            if len(paths) != labels.shape[0]:
                raise self.error(f"{split}: {len(paths)} images but {labels.shape[0]} labels", root)
            bad = labels[(labels < 0) | (labels >= self.num_classes)]
            if bad.size:
                raise self.error(f"{split}: label {int(bad[0]) + 1} (1-based) outside the {self.num_classes} "
                                 f"classes in {', '.join(str(p) for p in self.index_files(Path(root), split))}", root)
            memo[key] = (paths, labels)
        return memo[key]

    def files(self, root: Path, split: str) -> list[Path]:
        index = self.index_files(Path(root), split)
        if not all(p.is_file() for p in index):
            return index
        return index + self._samples(Path(root), split)[0]

    def require(self, root: Path, split: str) -> list[Path]:
        check_split(split)
        root = Path(root)
        index = self.index_files(root, split)
        missing = [p for p in index if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise self.error(f"missing {missing[0]}{more}", root)
        paths = self._samples(root, split)[0]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            first = missing[0]
            while not first.parent.exists() and first.parent != root:
                first = first.parent  # name the folder that is missing, not its first file
            more = f" ({len(missing)} of the {len(paths)} {split} images listed are absent)" if len(missing) > 1 \
                else ""
            raise self.error(f"missing {first}{more}", root)
        return index + paths

    def read(self, root: Path, split: str) -> ImageData:
        root = Path(root)
        paths, labels = self._samples(root, split)
        images_path, labels_path = self.cache_files(root, split, paths, labels)
        images = self._read_cache(images_path, labels_path, labels)
        if images is None:
            images = self._decode(root, split, paths, images_path, labels_path, labels)
        return ImageData.from_numpy(images, labels, self.num_classes)

    def prepare(self, root: Path, sources: Sequence[Path] = ()) -> str:
        if sources:
            return super().prepare(root, sources)
        for split in SPLITS:
            self.require(Path(root), split)
        return f"{self.name}: files present; {self.verify(root)}"  # decodes once, so runs find the cache

    def verify(self, root: Path) -> str:
        return (f"{super().verify(root)}; stored at {self.image_size}x{self.image_size}, cached in "
                f"{self.cache_dir(Path(root))}")

    # -- cache ------------------------------------------------------------------------------------------------
    def cache_dir(self, root: Path) -> Path:
        return Path(root) / "cache" / self.name

    def cache_files(self, root: Path, split: str, paths: list[Path], labels: np.ndarray) -> tuple[Path, Path]:
        """The cache's image and label files for this exact list of files (see the module docstring)."""
        h = hashlib.sha256(f"{DECODER}\0{self.name}\0{split}\0{self.image_size}\n".encode())
        prefix = len(str(root).rstrip(os.sep)) + 1  # paths are built under root: strip it (plain strings: fast)
        rows = []
        for path, label in [*zip(paths, labels.tolist()), *((p, -1) for p in self.index_files(root, split))]:
            name = str(path)
            st = os.stat(name)
            rows.append(f"{name[prefix:]}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n")
        h.update("".join(rows).encode())
        stem = f"{split}-{self.image_size}-{h.hexdigest()[:16]}"
        folder = self.cache_dir(root)
        return folder / f"{stem}.npy", folder / f"{stem}.labels.npy"

    def _read_cache(self, images_path: Path, labels_path: Path, labels: np.ndarray) -> np.ndarray | None:
        if not (images_path.is_file() and labels_path.is_file()):
            return None
        s = self.image_size
        try:
            if not np.array_equal(np.load(labels_path, allow_pickle=False), labels):
                return None
            images = np.load(images_path, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # truncated, replaced or removed meanwhile: decode again
            return None
        return images if images.dtype == np.uint8 and images.shape == (len(labels), 3, s, s) else None

    def _decode(self, root: Path, split: str, paths: list[Path], images_path: Path, labels_path: Path,
                labels: np.ndarray) -> np.ndarray:
        s, n = self.image_size, len(paths)
        buf, images = _npy_buffer((n, 3, s, s))
        if n >= ANNOUNCE:
            print(f"mpbench: decoding {self.name} {split} ({n} images, once; cached in {images_path.parent})",
                  file=sys.stderr, flush=True)

        def work(start: int) -> None:
            for i in range(start, min(start + CHUNK, n)):
                try:
                    images[i] = decode_image(paths[i], s).transpose(2, 0, 1)
                except MpbenchError:
                    raise
                except Exception as e:
                    raise self.error(f"cannot decode {paths[i]} ({type(e).__name__}: {e}): the file is truncated "
                                     f"or not an image; import the dataset again", root) from None

        with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
            futures = [pool.submit(work, start) for start in range(0, n, CHUNK)]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        self._write_cache(buf, images_path, labels_path, labels)
        return images

    def _write_cache(self, buf: np.ndarray, images_path: Path, labels_path: Path, labels: np.ndarray) -> None:
        from mpbench.store import atomic_write

        try:
            images_path.parent.mkdir(parents=True, exist_ok=True)
            out = io.BytesIO()
            np.save(out, labels, allow_pickle=False)
            atomic_write(labels_path, out.getvalue())
            atomic_write(images_path, memoryview(buf))  # the .npy bytes: header + the decoded images
            split_size = images_path.name.split("-")[:2]
            for old in images_path.parent.glob(f"{split_size[0]}-{split_size[1]}-*.npy"):
                if old not in (images_path, labels_path):
                    old.unlink(missing_ok=True)
        except OSError as e:
            warnings.warn(f"{self.name}: cannot write the decoded cache in {images_path.parent} "
                          f"({type(e).__name__}: {e}); every process will decode the images again")
