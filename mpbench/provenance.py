"""What every result records about where it came from: git SHA (+dirty), library versions, device."""
from __future__ import annotations

import functools
import platform
import subprocess
from typing import Any

import torch


@functools.cache
def git_info() -> dict[str, Any]:
    """The git SHA (+dirty) of the mpbench checkout the imported package lives in; ``source: installed`` and no SHA
    for an installed wheel (never the SHA of whatever repository the working directory or site-packages is in)."""
    from mpbench.config import source_checkout

    root = source_checkout()
    if root is None or not (root / ".git").exists():
        return {"sha": "unknown", "dirty": False, "source": "installed" if root is None else "source tree"}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", False
    return {"sha": sha or "unknown", "dirty": dirty, "source": "checkout"}


@functools.cache
def versions() -> dict[str, str]:
    import timm
    import torchvision

    import mpbench

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "mpbench": mpbench.__version__}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
