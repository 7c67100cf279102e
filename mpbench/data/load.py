"""``load_dataset``: decode once per process, then subset, convert channels and resize."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from mpbench.data.base import DATASETS, ImageData, check_split
from mpbench.data.ops import first_per_class, resize, select_classes, to_channels
from mpbench.errors import UsageError


def default_data_root() -> Path:
    """``$MPBENCH_DATA``, else the user cache dir: ``~/.cache/mpbench/data`` (``$XDG_CACHE_HOME``) on Linux,
    ``~/Library/Caches/mpbench/data`` on macOS, ``%LOCALAPPDATA%\\mpbench\\Cache\\data`` on Windows."""
    env = os.environ.get("MPBENCH_DATA")
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "mpbench" / "Cache" / "data"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "mpbench" / "data"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else home / ".cache") / "mpbench" / "data"


@functools.lru_cache(maxsize=16)
def _decoded(name: str, root: str, split: str) -> ImageData:
    return DATASETS.get(name)().load(Path(root), split)


def clear_cache() -> None:
    """Forget the decoded datasets held by this process."""
    _decoded.cache_clear()


def load_dataset(name: str, root: Path, split: str, *, image_size: int | None = None, channels: int | None = None,
                 per_class: int | None = None, classes: list[int] | None = None) -> ImageData:
    """Load a split, then keep ``classes`` (relabelled 0..k-1 in that order), the first ``per_class`` images of
    each class (file order), convert to ``channels`` and resize to ``image_size``.

    The decoded split is cached per (name, root, split), so the returned tensors may be shared: do not modify
    them in place.
    """
    source = DATASETS.get(name)
    check_split(split)
    if channels is not None and channels not in (1, 3):
        raise UsageError(f"channels must be 1 or 3, got {channels}")
    key = "" if source.builtin else str(Path(root).expanduser().resolve())
    data = _decoded(name, key, split)
    if classes is not None:
        data = select_classes(data, list(classes))
    if per_class is not None:
        data = first_per_class(data, int(per_class))
    if channels == 1:
        data = to_channels(data, 1)  # before resizing: fewer values to interpolate
    if image_size is not None:
        data = resize(data, int(image_size))
    if channels == 3:
        data = to_channels(data, 3)  # after resizing, for the same reason
    return ImageData(data.images, data.labels, data.num_classes)
