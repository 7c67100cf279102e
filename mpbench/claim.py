"""Exclusive claims on run directories, safe across processes and hosts on a shared filesystem.

A claim is a ``lock`` file created with O_EXCL holding host, pid, start time and a heartbeat that its owner
refreshes. A claim is stale when its pid is dead on this host, or its heartbeat is older than ``stale_after_s``;
a stale claim is taken over by renaming it away atomically (only one contender wins the rename).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

HOST = socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone: it runs nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True                                # no /proc (not Linux): kill(pid, 0) said it exists


def read_claim(lock: Path) -> dict[str, Any] | None:
    try:
        return json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"host": "?", "pid": -1, "heartbeat": lock.stat().st_mtime if lock.exists() else 0}


def slurm_job_id() -> str | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else job


def is_stale(claim: dict[str, Any], stale_after_s: float) -> bool:
    if claim.get("host") == HOST and not pid_alive(int(claim.get("pid", -1))):
        return True
    if claim.get("slurm_job_id") and claim.get("slurm_job_id") == slurm_job_id():
        return True                                # our own job's previous attempt: Slurm requeued it, it is dead
    return time.time() - float(claim.get("heartbeat", 0)) > stale_after_s


def holder_gone(claim: dict[str, Any], stale_after_s: float | None = None) -> str | None:
    """Why the process holding ``claim`` is not working on it any more, or None when it may be: its pid is dead
    on this host, or its heartbeat is older than the claim's own stale limit (``stale_after_s`` when it records
    none). For display: unlike :func:`is_stale` it does not treat this Slurm job's claims as its own."""
    who = f"process {claim.get('pid', '?')} on {claim.get('host', '?')}"
    try:
        if claim.get("host") == HOST and not pid_alive(int(claim.get("pid", -1))):
            return f"{who} is gone"
        limit = float(claim.get("stale_after_s") or stale_after_s or 300.0)
        age = time.time() - float(claim.get("heartbeat", 0))
    except (TypeError, ValueError):
        return f"{who}: its claim is unreadable"
    return f"{who} sent no heartbeat for {age:.0f}s (limit {limit:.0f}s)" if age > limit else None


class Claim:
    """Context manager: ``with Claim(lock_path) as ok:`` — ok is False when someone else holds the run."""

    def __init__(self, lock: Path, heartbeat_s: float = 30.0, stale_after_s: float = 300.0,
                 info: dict[str, Any] | None = None):
        self.lock, self.heartbeat_s, self.stale_after_s = Path(lock), heartbeat_s, stale_after_s
        self.info = {"host": HOST, "pid": os.getpid(), "started": time.time(), "stale_after_s": stale_after_s,
                     **(info or {})}
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write_new(self) -> bool:
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.info, "heartbeat": time.time()}, f)
        return True

    def acquire(self) -> bool:
        if self._write_new():
            self.held = True
        else:
            claim = read_claim(self.lock)
            if claim is not None and not is_stale(claim, self.stale_after_s):
                return False
            grave = self.lock.with_name(f"lock.stale.{os.getpid()}.{time.time_ns()}")
            try:
                os.rename(self.lock, grave)       # atomic: one contender wins
            except FileNotFoundError:
                pass
            else:
                grave.unlink(missing_ok=True)
            self.held = self._write_new()
        if self.held:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self.held

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            claim = read_claim(self.lock)
            if not claim or claim.get("pid") != self.info["pid"] or claim.get("host") != HOST:
                return                            # lost the claim (taken over): stop touching it
            tmp = self.lock.with_name(f".lock.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**self.info, "heartbeat": time.time()}))
            os.replace(tmp, self.lock)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held:
            claim = read_claim(self.lock)
            if claim and claim.get("pid") == self.info["pid"] and claim.get("host") == HOST:
                self.lock.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
