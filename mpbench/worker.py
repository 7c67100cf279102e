"""Worker entry point: ``python -m mpbench.worker '<json args>'`` executes one job in its run directory.

Exit codes: 0 done/skipped, 1 failed, 3 interrupted (checkpointed; resume later), 4 busy (claimed elsewhere).

A worker never outlives its driver (``args["parent"]``, the pool launcher's pid): on Linux the kernel sends it
SIGTERM when the driver dies (``PR_SET_PDEATHSIG``), and a watcher thread sends it one itself when its parent
changes (the driver died before ``prctl``, or elsewhere than Linux). SIGTERM, like every stop signal, makes the run
checkpoint at its next step and stop (``mpbench.runner.StopFlag``).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

EXIT = {"done": 0, "skipped": 0, "failed": 1, "interrupted": 3, "busy": 4}
OUTCOME = {v: k for k, v in EXIT.items() if k != "skipped"}
PR_SET_PDEATHSIG = 1
PARENT_POLL_S = 1.0


def die_with_parent() -> None:
    """Linux: ask the kernel for SIGTERM when the parent dies (no-op elsewhere, or when prctl is unavailable)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def watch_parent(parent: int, poll_s: float = PARENT_POLL_S) -> None:
    """SIGTERM to this process as soon as its parent is not ``parent`` any more (checked now, then every poll)."""

    def gone() -> bool:
        return os.getppid() != parent

    def watch() -> None:
        while not gone():
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    if gone():
        os.kill(os.getpid(), signal.SIGTERM)
        return
    threading.Thread(target=watch, daemon=True, name="mpbench-parent-watch").start()


def run_job(args: dict) -> str:
    import torch

    from mpbench.runner import Execution, execute

    device = torch.device(args.get("device", "cpu"))
    ex = Execution(results=Path(args["results"]), data_root=Path(args["data_root"]), device=device,
                   threads=int(args.get("threads", 0)), suite=args.get("suite", ""), wandb=args.get("wandb", {}),
                   heartbeat_s=float(args.get("heartbeat_s", 30)), stale_after_s=float(args.get("stale_after_s", 300)))
    return execute(Path(args["results"]), args["kind"], args["id"], ex, force=bool(args.get("force")))


def main() -> None:
    args = json.loads(sys.argv[1])
    parent = int(args.get("parent") or os.getppid())
    die_with_parent()                              # before the slow imports: until StopFlag, SIGTERM just ends us
    from mpbench.runner import StopFlag

    try:
        with StopFlag() as stop:                   # the whole job, not only its training loop
            watch_parent(parent)
            outcome = "interrupted" if stop.flag.is_set() else run_job(args)
    except KeyboardInterrupt:                      # a second SIGINT: the runner recorded the run as pending
        outcome = "interrupted"
    sys.exit(EXIT[outcome])


if __name__ == "__main__":
    main()
