"""Pool workers forked from the driver: no interpreter start-up, no second import of torch and timm.

A fresh ``python -m mpbench.worker`` costs about 3 s of imports on the 2-core CI machine before its first job
(``mpbench bench makespan``); a child forked from a driver that has imported them already starts at once and
shares their memory copy-on-write. Fork is only safe from a driver that

* pinned torch to one intra-op thread before importing anything that could run an operation
  (:func:`pin_driver`): GNU OpenMP's thread pool does not survive ``fork``, and the child of a process that ran
  one multi-threaded operation hangs at its own first one (measured here with torch 2.14: a 2-thread matmul in the
  parent, then any parallel op in the child, never returns). A driver that runs no job in process computes
  nothing, so one thread costs it nothing;
* has not initialised CUDA (a forked child cannot use it), and
* runs no other Python thread (a lock it holds would stay locked in the child; e.g. rich's display refresh), and no
  more native threads than when it was pinned (a thread pool that ran in between: the same hang).

Where any of these does not hold (or off Linux, or ``MPBENCH_WORKER_START=exec``) the pool starts
``python -m mpbench.worker --serve`` as before; so it does for GPU slots unless ``MPBENCH_WORKER_START=fork``
(a forked child initialises CUDA itself, which is sound when the driver never touched CUDA, but had not been run
on a GPU when this was written); the worker's slot log says which start it got and why.
The child gets what the exec'd worker gets: its own session, ``CUDA_VISIBLE_DEVICES`` and thread count, stdin
from the driver, stdout/stderr to its slot log, default signal handlers, SIGTERM when the driver dies; it closes
the driver's other pipes (so another worker still sees EOF when the driver closes its stdin) and exits with
``os._exit`` (nothing of the driver's ``atexit`` runs in it). ``ps`` shows it as ``mpbench-worker``.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import IO

START_ENV = "MPBENCH_WORKER_START"       # "exec": never fork (the workers start as separate interpreters)
PROCESS_NAME = b"mpbench-worker"
PR_SET_NAME = 15
_PINNED: dict[str, object] = {"driver": False, "native_threads": 0}


def pin_driver() -> None:
    """Called by a driver that runs no job itself, before anything imports torch: one intra-op thread from the
    start, so its pool workers can be forked (see the module docstring). No-op once torch is imported (an operation
    may have run on several threads already: fork stays off)."""
    if "torch" in sys.modules:
        return
    import torch

    torch.set_num_threads(1)
    _PINNED.update(driver=True, native_threads=_native_threads())


def unavailable(gpu: bool = False) -> str | None:
    """Why a worker (of a GPU slot when ``gpu``) cannot be forked from this process now, or None."""
    start = os.environ.get(START_ENV, "auto").lower()
    if start == "exec":
        return f"{START_ENV}=exec"
    if gpu and start != "fork":
        return (f"a GPU slot: forked CUDA workers are not yet verified on a GPU ({START_ENV}=fork forks them; "
                f"scripts/gpu_check.sh does)")
    if not sys.platform.startswith("linux"):
        return f"fork is used on Linux only (this is {sys.platform})"
    if not _PINNED["driver"]:
        return "the driver imported torch before pinning it to one thread (mpbench.fork.pin_driver)"
    import torch

    if torch.get_num_threads() != 1:
        return f"the driver runs torch on {torch.get_num_threads()} threads"
    if torch.cuda.is_initialized():
        return "the driver initialised CUDA"
    if threading.active_count() > 1:
        return f"the driver runs {threading.active_count() - 1} other thread(s)"
    extra = _native_threads() - int(_PINNED.get("native_threads", 0))
    if extra > 0:       # e.g. an OpenMP pool: the driver ran on more threads since it was pinned, then went back to 1
        return f"the driver started {extra} native thread(s) since it was pinned (a forked child could hang on them)"
    return None


def _native_threads() -> int:
    """The process's native threads (Linux: /proc/self/task), Python's and every library's pools alike."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def preload() -> None:
    """Import in the driver what every worker imports (``mpbench.worker.serve``), once for all of them."""
    import mpbench.models  # noqa: F401
    import mpbench.train  # noqa: F401
    from mpbench.provenance import git_info

    git_info()


class ForkedProcess:
    """The part of :class:`subprocess.Popen` the pool uses, for a forked worker."""

    def __init__(self, pid: int, stdin: IO[bytes]) -> None:
        self.pid, self.stdin = pid, stdin
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:          # reaped elsewhere: its code is lost
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode


def fork_worker(args: dict, env: dict[str, str], threads: int, log_fd: int, close_fds: list[int]) -> ForkedProcess:
    """Fork a persistent worker (``mpbench.worker.serve(args)``): ``log_fd`` becomes its stdout and stderr,
    ``close_fds`` (the driver's pipes to other workers) are closed in it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                               # the child: never returns
        code = 1
        try:
            os.close(w)
            code = _child(args, env, threads, r, log_fd, close_fds)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - a worker's own fault: its log says what
            with contextlib.suppress(Exception):
                traceback.print_exc()
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)
    os.close(r)
    return ForkedProcess(pid, os.fdopen(w, "wb"))


def _child(args: dict, env: dict[str, str], threads: int, stdin_fd: int, log_fd: int, close_fds: list[int]) -> int:
    from mpbench.worker import EXIT, die_with_parent, serve

    os.setsid()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    os.dup2(stdin_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for fd in {stdin_fd, log_fd} - {0, 1, 2}:
        os.close(fd)
    sys.stdin = open(0, "r", closefd=False)                    # noqa: SIM115 - the process's own streams
    sys.stdout = open(1, "w", buffering=1, closefd=False)      # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)      # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    _set_name()
    die_with_parent()
    import torch

    torch.set_num_threads(threads)                             # OMP_NUM_THREADS was read when the driver loaded it
    try:
        return serve(args)
    except KeyboardInterrupt:
        return EXIT["interrupted"]


def _set_name() -> None:
    """``ps``/``top`` show ``mpbench-worker`` (the command line stays the driver's)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, PROCESS_NAME, 0, 0, 0)
