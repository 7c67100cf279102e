"""A wheel that works outside the checkout: built from a copy of the tree, installed into a fresh venv, and run from
an empty directory (suites found inside the package, no project-root assumptions, no foreign git SHA)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml


def _installed(dist: str) -> bool:
    """Without importing it: importlib's finder for `pip` runs setuptools' distutils hack, which breaks
    torch.compile's C++ builds later in the same test process."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return bool(version(dist))
    except PackageNotFoundError:
        return False

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("pyproject.toml", "setup.py", "README.md", "mpbench", "regularizers", "suites")   # what the build reads
BIN = "Scripts" if os.name == "nt" else "bin"

pytestmark = pytest.mark.skipif(
    not _installed("setuptools") or not _installed("pip"),
    reason="building the wheel without network needs pip and setuptools in the test environment")


def _copy_tree(dest: Path) -> Path:
    """The files the build reads, without caches or build leftovers (the build writes into the copy, not the clone)."""
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SHIPPED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MPBENCH_SUITES", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1",
               PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def _run(args: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def _fresh_venv(where: Path) -> tuple[Path, Path]:
    """A venv without pip (the test environment's pip installs into it): (its python, its site-packages)."""
    _run([sys.executable, "-m", "venv", "--without-pip", where], cwd=where.parent)
    python = where / BIN / ("python.exe" if os.name == "nt" else "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=where).stdout
    return python, Path(site.strip())


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@example.org", "-c", "user.name=t", *args], cwd=repo, check=True,
                   capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, mpbench script, wheel path) of the wheel installed with --no-deps into a venv that sees the test
    environment's site-packages through a .pth file (torch etc. are not reinstalled). The venv lives inside an
    unrelated git repository, whose SHA the installed mpbench must not report."""
    tmp = tmp_path_factory.mktemp("wheel")
    had_build = (ROOT / "build").exists()
    src = _copy_tree(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src],
         cwd=tmp)
    assert (ROOT / "build").exists() == had_build
    (wheel,) = (tmp / "dist").glob("mpbench-*.whl")
    other_repo = tmp / "other-repo"
    other_repo.mkdir()
    if shutil.which("git"):
        _git(other_repo, "init", "-q")
        _git(other_repo, "commit", "-q", "--allow-empty", "-m", "unrelated")
    python, site = _fresh_venv(other_repo / "venv")
    # install first, then expose the test environment: pip must not see (and try to replace) its editable mpbench
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp)
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_mpbench_test_outer.pth").write_text("".join(f"{p}\n" for p in outer))
    return python, python.parent / "mpbench", wheel


def test_wheel_carries_every_package_and_suite(installed):
    _, _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = [p.relative_to(ROOT).as_posix() for d in ("mpbench", "regularizers")
                for p in (ROOT / d).rglob("__init__.py") if "__pycache__" not in p.parts]
    assert packages and not [p for p in packages if p not in names]
    suites = sorted(p.name for p in (ROOT / "suites").glob("*.yaml"))
    assert "quickstart.yaml" in suites
    assert not [s for s in suites if f"mpbench/suites/{s}" not in names]
    assert "regularizers/_perturb_kernel.c" in names
    requires = [line for line in zipfile.ZipFile(wheel).read(
        f"mpbench-{wheel.name.split('-')[1]}.dist-info/METADATA").decode().splitlines() if line.startswith("Requires")]
    for dep in ("scipy", "PyYAML", "torch", "timm", "omegaconf", "pandas"):
        assert any(line.startswith(f"Requires-Dist: {dep}") for line in requires), dep


def test_installed_wheel_runs_from_an_empty_directory(installed, tmp_path):
    python, mpbench, _ = installed
    cwd = tmp_path / "empty"
    cwd.mkdir()
    where = _run([python, "-c", "import sys, mpbench; print(mpbench.__file__); "
                  "print(any('__editable__' in m for m in sys.modules))"], cwd=cwd).stdout.split()
    assert Path(where[0]).is_relative_to(python.parent.parent) and where[1] == "False"

    listed = _run([mpbench, "list", "suites"], cwd=cwd).stdout
    assert "quickstart" in listed and "metaperturb-official" in listed

    suite = cwd / "wheel-tiny.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "wheel-tiny", "grid": {"regularizer": ["base"], "model": ["conv4"], "dataset": ["synthetic"]},
        "model_kwargs": {"width": 8}, "train": {"steps": 2, "batch_size": 32, "eval_batch_size": 100}}))
    res = tmp_path / "res"
    _run([mpbench, "run", f"suite={suite}", "--results", res], cwd=cwd)
    (result,) = res.glob("runs/*/result.json")
    r = json.loads(result.read_text())
    assert r["steps"] == 2 and 0.0 <= r["final"]["acc"] <= 1.0
    assert r["git"]["sha"] == "unknown" and r["git"]["source"] == "installed"   # not the enclosing repo's SHA

    plan = _run([mpbench, "run", "suite=quickstart", "--dry-run", "--results", tmp_path / "res2"], cwd=cwd)
    assert "metatrain" in plan.stdout + plan.stderr and not (tmp_path / "res2" / "runs").exists()


def test_editable_install_finds_the_suites_in_the_tree(tmp_path):
    """``pip install -e .`` (CI, README) maps mpbench.suites to the top-level suites/ directory."""
    src = _copy_tree(tmp_path / "src")
    python, _ = _fresh_venv(tmp_path / "venv")
    # what `pip install -e` does, with this environment's setuptools (the fresh venv has none): the PEP 660 hook
    _run([sys.executable, "-c", f"import setuptools.build_meta as b; b.build_editable({str(tmp_path / 'dist')!r})"],
         cwd=src)
    (wheel,) = (tmp_path / "dist").glob("mpbench-*.whl")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp_path)
    out = _run([python, "-c", "import importlib.resources as r; print(r.files('mpbench.suites'))"], cwd=tmp_path).stdout
    assert Path(out.strip()).resolve() == (src / "suites").resolve()
