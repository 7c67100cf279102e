"""``mpbench data prepare NAME --from PATH``: import what the user downloaded into a dataset's layout.

A dataset lists its ``parts``: where each piece of its layout goes under the data root, and how to recognise it in
what the user gives (``--from`` once or more: a zip, a tar / tgz / tar.gz / tar.bz2 / tar.xz, an extracted folder,
or a plain file). Archives are checked against their published md5 when the dataset declares one (by file name),
then extracted into a staging folder under the data root (members with absolute paths or ``..`` are refused;
tarfile's ``data`` filter refuses links leaving the folder, devices and the like). Each part found is moved (from an
archive) or copied (from a folder or file) into place; a part already there is replaced only once its successor is
complete. Nothing is written outside the data root, and the staging folder is removed in every case.
"""
from __future__ import annotations

import lzma
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Sequence

from mpbench.errors import DataMissingError, UsageError

if TYPE_CHECKING:
    from mpbench.data.base import DatasetSource

TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
SKIP_DIRS = ("__MACOSX",)  # macOS resource forks inside zips
STAGING_PREFIX = ".import-"
_CORRUPT = (zipfile.BadZipFile, tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class Part:
    """One piece of a layout: ``dest`` (a path under the data root) is the entry named ``name`` (a file, or a folder
    when ``contains`` is given too) or, without a name, the folder that holds every path in ``contains``. When
    several entries match, the one nearest the top of what was given wins."""

    dest: str
    name: str | None = None
    contains: tuple[str, ...] = ()

    def describe(self) -> str:
        if not self.contains:
            return str(self.name)
        named = f"{self.name}/ " if self.name else ""
        return f"folder {named}with {', '.join(self.contains)}"


def archive_kind(path: Path) -> str | None:
    """``"zip"``, ``"tar"`` (compressed or not) or None for a plain file: by suffix, else by content."""
    lower = path.name.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        try:
            return "tar" if tarfile.is_tarfile(path) else None
        except (OSError, *_CORRUPT):
            return None
    return None


def _check_member(archive: Path, name: str) -> None:
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) or ".." in PurePosixPath(posix).parts:
        raise UsageError(f"{archive}: refusing to extract member {name!r} (an absolute path or '..' would write "
                         f"outside the data dir); give the dataset's official archive")


def extract(archive: Path, kind: str, dest: Path, rerun: str) -> None:
    """Extract ``archive`` into ``dest`` safely; a truncated or corrupt archive is a one-line ``DataMissingError``."""
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    _check_member(archive, info.filename)
                zf.extractall(dest)
        else:
            def checked(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
                _check_member(archive, member.name)  # refused, not rewritten (the data filter strips a leading /)
                return tarfile.data_filter(member, path)

            with tarfile.open(archive) as tf:
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(dest, filter=checked)  # one pass; a refused member aborts (dest is staging)
                else:  # Python < 3.11.4 has no extraction filters: regular files and folders only
                    for member in tf:
                        _check_member(archive, member.name)
                        if not (member.isfile() or member.isdir()):
                            raise UsageError(f"{archive}: refusing to extract {member.name!r} (not a regular file "
                                             f"or folder); give the dataset's official archive")
                        tf.extract(member, dest)
    except tarfile.FilterError as e:  # a link leaving the folder, a device file, ...
        raise UsageError(f"{archive}: refusing to extract it ({type(e).__name__}: {e}); give the dataset's "
                         f"official archive") from None
    except _CORRUPT as e:
        raise DataMissingError(f"{archive} is truncated or corrupt ({type(e).__name__}: {_first_line(e)}): download "
                               f"it again, then {rerun}") from None
    except OSError as e:
        if e.errno is None:  # raised by a decompressor (bz2: "Invalid data stream"), not by the file system
            raise DataMissingError(f"{archive} is truncated or corrupt ({_first_line(e)}): download it again, "
                                   f"then {rerun}") from None
        raise DataMissingError(f"cannot extract {archive} into {dest.parent} ({type(e).__name__}: "
                               f"{_first_line(e)}): free space or fix permissions, then {rerun}") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:160] if lines else ""


class _Tree:
    """One thing given with --from, walked once: its folders and their entries (``top`` itself may be a file)."""

    def __init__(self, top: Path, owned: bool, label: str):
        self.top, self.owned, self.label = top, owned, label
        self.dirs: list[tuple[int, Path, set[str]]] = []  # (depth, folder, names inside)
        if top.is_dir():
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(STAGING_PREFIX))
                d = Path(dirpath)
                depth = len(d.relative_to(top).parts)
                self.dirs.append((depth, d, set(dirnames) | set(filenames)))

    def find(self, part: Part) -> tuple[int, Path] | None:
        """The shallowest entry matching ``part`` (depth counted from the top of what was given)."""
        if not self.top.is_dir():
            return (0, self.top) if not part.contains and part.name == self.top.name else None
        best: tuple[int, Path] | None = None
        for depth, d, names in self.dirs:
            if part.contains:
                if (part.name is None or d.name == part.name) and all((d / c).exists() for c in part.contains):
                    hit = (depth, d)
                else:
                    continue
            elif part.name in names:
                hit = (depth + 1, d / str(part.name))
            else:
                continue
            if best is None or hit[0] < best[0]:
                best = hit
        return best


def _md5_check(ds: "DatasetSource", archive: Path, rerun: str) -> bool:
    from mpbench.data.base import md5sum

    want = ds.archive_md5.get(archive.name)
    if want is None:
        return False
    digest = md5sum(archive)
    if digest != want:
        raise DataMissingError(f"dataset {ds.name!r}: {archive} has md5 {digest}, not the published {want} (a "
                               f"truncated download or not the official file): download it again, then {rerun}")
    return True


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*SKIP_DIRS))
    else:
        shutil.copy2(src, dst)


def import_sources(ds: "DatasetSource", root: Path, sources: Sequence[Path]) -> str:
    """Place every part of ``ds``'s layout under ``root`` from ``sources``; returns what was done (one phrase)."""
    given = " ".join(f"--from {s}" for s in sources)
    rerun = f"run `mpbench data prepare {ds.name} {given}`"
    if not ds.parts:
        raise UsageError(f"dataset {ds.name!r}: --from is not supported (it has no importable layout); "
                         f"{ds.how_to_get}")
    for src in sources:
        if not Path(src).expanduser().exists():
            raise UsageError(f"--from {src}: no such file or folder; give the downloaded archive or folder of "
                             f"dataset {ds.name!r} ({ds.how_to_get})")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{ds.name}-", dir=root))
    try:
        trees, checked = [], 0
        for i, src in enumerate(Path(s).expanduser() for s in sources):
            kind = None if src.is_dir() else archive_kind(src)
            if kind is None:
                trees.append(_Tree(src, owned=False, label=str(src)))
                continue
            checked += _md5_check(ds, src, rerun)
            out = staging / f"src{i}"
            out.mkdir()
            extract(src, kind, out, rerun)
            trees.append(_Tree(out, owned=True, label=str(src)))

        found: list[tuple[Part, Path, bool]] = []
        for part in ds.parts:
            hits = [(hit, tree) for tree in trees if (hit := tree.find(part)) is not None]
            if not hits:
                how = ds.how_to_get.replace("<data root>", str(root))
                raise DataMissingError(f"dataset {ds.name!r}: {given} holds no {part.describe()} (needed for "
                                       f"{root / part.dest}); to get it: {how}")
            (_, path), tree = min(hits, key=lambda ht: ht[0][0])
            found.append((part, path, tree.owned))

        placed, kept = [], 0
        for j, (part, path, owned) in enumerate(sorted(found, key=lambda f: f[1].is_dir())):  # files first
            dest = root / part.dest
            if dest.exists() and dest.resolve() == path.resolve():
                kept += 1
                continue
            new = staging / f"new{j}"
            try:
                if owned:
                    os.replace(path, new)
                else:
                    _copy(path, new)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.exists() or dest.is_symlink():
                    os.replace(dest, staging / f"old{j}")  # removed with the staging folder
                os.replace(new, dest)
            except OSError as e:
                raise DataMissingError(f"dataset {ds.name!r}: cannot place {dest} ({type(e).__name__}: "
                                       f"{_first_line(e)}): free space or fix permissions under {root}, then "
                                       f"{rerun}") from None
            placed.append(part.dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    what = f"imported {', '.join(placed)} into {root}" if placed else f"already in place under {root}"
    md5 = f" ({checked} archive md5 ok)" if checked else ""
    return what + md5 + (f", {kept} part(s) already in place" if placed and kept else "")
