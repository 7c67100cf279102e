"""Named files that suites use by name (``stages.metatrain.file: metaperturb_official``).

mpbench ships no copy of them (the authors' release has no licence file): ``mpbench data prepare NAME`` downloads
the file, or copies one you fetched (``--from FILE``), into ``<data root>/assets/NAME/<file name>`` after checking
its sha256 and that it parses; ``mpbench data verify NAME`` checks it again.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mpbench.errors import DataMissingError, UsageError, did_you_mean
from mpbench.registry import Registry

OFFLINE_VARS = ("MPBENCH_OFFLINE",)   # set (1/true/yes/on): never try a download (HF_HUB_OFFLINE is for timm's hub
                                      # and mpbench's CLI sets it by default, so it cannot mean "no download" here)
DOWNLOAD_TIMEOUT_S = 20.0


def _check_phi_file(path: Path) -> None:
    """Loads with ``torch.load(weights_only=True)`` as exactly the 82 floats of a MetaPerturb phi, else a UsageError."""
    from regularizers.metaperturb import load_phi_file

    try:
        load_phi_file(path)
    except UsageError as e:
        if "Weights only load failed" not in str(e):    # torch's words for pickled objects beyond tensors
            raise
        raise UsageError(f"{path}: refused: it holds pickled Python objects, not only tensors (a MetaPerturb phi "
                         f"is a state dict of tensors; mpbench never unpickles code)") from None


@dataclass(frozen=True)
class Asset:
    name: str
    filename: str
    sha256: str
    url: str                             # where the file is published upstream
    description: str
    check: Callable[[Path], None]        # raises a one-line UsageError if the file does not parse as expected

    def path(self, data_root: Path) -> Path:
        return Path(data_root) / "assets" / self.name / self.filename

    def fetch_hint(self, data_root: Path | None = None) -> str:
        data = f" --data {data_root}" if data_root is not None else ""
        return f"fetch {self.url} and run `mpbench data prepare {self.name} --from {self.filename}{data}`"


ASSETS: Registry[Asset] = Registry("asset")


def register_asset(asset: Asset) -> Asset:
    return ASSETS.register(asset.name, asset.description)(asset)


register_asset(Asset(
    name="metaperturb_official",
    filename="perturb_750.pth",
    sha256="63f47f80b32a00840b3af0b84ae778543de27c7eb9450d76261bfacad182211f",
    url="https://raw.githubusercontent.com/JWoong148/MetaPerturb/master/checkpoints/src/"
        "tiny_imagenet_resnet20_final/perturb_750.pth",
    description="the authors' released MetaPerturb phi (Tiny ImageNet source, ResNet-20, 750 meta-steps; 82 floats)",
    check=_check_phi_file,
))


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def offline() -> str | None:
    """The environment variable that asks mpbench to stay offline, or None."""
    return next((v for v in OFFLINE_VARS if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")),
                None)


def _default_root(data_root: Path | None) -> Path:
    from mpbench.data import default_data_root

    return Path(data_root) if data_root is not None else default_data_root()


def _check_content(asset: Asset, data: bytes, source: str) -> None:
    """sha256 of the release; the parse check runs first (on the file at ``source``) so that a wrong or unsafe file
    gets the more telling message."""
    asset.check(Path(source))
    digest = sha256_of(data)
    if digest != asset.sha256:
        raise UsageError(f"{source}: sha256 {digest[:16]}... is not that of {asset.name} ({asset.sha256[:16]}...): "
                         f"give the file published at {asset.url} (a phi of your own: set the suite's stage file to "
                         f"its path instead)")


def _download(asset: Asset, data_root: Path | None) -> bytes:
    which = offline()
    if which:
        raise DataMissingError(f"{asset.name} is not prepared and {which} is set (offline, no download tried): "
                               f"{asset.fetch_hint(data_root)}")
    try:
        with urllib.request.urlopen(asset.url, timeout=DOWNLOAD_TIMEOUT_S) as r:   # noqa: S310 (a fixed https URL)
            return r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = str(getattr(e, "reason", None) or e).strip().splitlines()
        raise DataMissingError(f"{asset.name}: cannot download ({reason[0][:120] if reason else type(e).__name__}): "
                               f"{asset.fetch_hint(data_root)}") from None


def prepare(name: str, data_root: Path | None = None, source: Path | None = None) -> str:
    """Store asset ``name`` under the data root: copied from ``source`` (a file you fetched), else downloaded unless
    offline; the content is checked (parse, then sha256) before it is written atomically."""
    from mpbench.store import atomic_write

    asset = ASSETS.get(name)
    given_root = Path(data_root) if data_root is not None else None
    target = asset.path(_default_root(data_root))
    if source is not None:
        src = Path(source).expanduser()
        if not src.is_file():
            raise UsageError(f"--from {source}: no such file: give the path of the downloaded {asset.filename}")
        data = src.read_bytes()
        _check_content(asset, data, str(src))
    else:
        if target.is_file() and sha256_of(target.read_bytes()) == asset.sha256:
            return f"{name}: already prepared at {target}"
        data = _download(asset, given_root)
        with tempfile.TemporaryDirectory() as tmp:
            downloaded = Path(tmp) / asset.filename
            downloaded.write_bytes(data)
            try:
                _check_content(asset, data, str(downloaded))
            except UsageError as e:
                raise DataMissingError(f"{asset.url}: the download is not {asset.name} ({e}): "
                                       f"{asset.fetch_hint(given_root)}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, data)
    return f"{name}: stored at {target} (sha256 {asset.sha256[:16]}...)"


def verify(name: str, data_root: Path | None = None) -> str:
    """Asset ``name`` is present under the data root and its sha256 is the published one."""
    asset = ASSETS.get(name)
    return f"{name}: {stored_path(asset, data_root)} present, sha256 ok"


def stored_path(asset: Asset, data_root: Path | None, key: str | None = None) -> Path:
    """The stored file of ``asset``, checked (present, sha256); else a DataMissingError saying how to prepare it."""
    given_root = Path(data_root) if data_root is not None else None
    path = asset.path(_default_root(data_root))
    where = f"{key}={asset.name}: " if key else ""
    data = f" --data {given_root}" if given_root is not None else ""
    if not path.is_file():
        raise DataMissingError(f"{where}{asset.name} is not prepared ({path} missing): run `mpbench data prepare "
                               f"{asset.name}{data}` (downloads it), or fetch {asset.url} and run "
                               f"`mpbench data prepare {asset.name} --from FILE{data}`")
    digest = sha256_of(path.read_bytes())
    if digest != asset.sha256:
        raise DataMissingError(f"{where}{path} is corrupt (sha256 {digest[:16]}..., expected {asset.sha256[:16]}...): "
                               f"rerun `mpbench data prepare {asset.name} --from FILE{data}` (FILE: {asset.url})")
    return path


def dataset_or_asset(name: str, datasets: Registry):
    """The dataset class ``name``; an unknown name is a one-line error listing datasets and assets."""
    if name not in datasets:
        raise UsageError(f"unknown dataset or asset {name!r}: "
                         f"{did_you_mean(name, [*datasets.names(), *ASSETS.names()])}")
    return datasets.get(name)


def resolve_stage_file(value: str, suite_dir: Path | None, data_root: Path | None,
                       key: str = "stages.<kind>.file") -> Path:
    """A stage file given in a suite: an asset name (its stored, checked copy), else an absolute path, else a path
    relative to the suite file's directory, then to the working directory."""
    value = str(value)
    if value in ASSETS:
        return stored_path(ASSETS.get(value), data_root, key).resolve()
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [*([Path(suite_dir) / p] if suite_dir is not None else []), Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise UsageError(f"{key}={value}: file not found (looked for {looked}): give an asset name "
                     f"({', '.join(ASSETS.names())}), an absolute path, or a path relative to the suite file or the "
                     f"working directory")
