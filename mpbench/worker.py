"""Worker entry points: pool workers (``mpbench.launchers.pool``) and the per-job isolation they and Slurm's
multi-job array elements (``launcher.jobs_per_task``) share.

``python -m mpbench.worker --serve '<json args>'`` is a persistent pool worker: it imports torch and timm once,
then executes job after job (``run_job``). Protocol:

* stdin: one JSON object per line, a job's worker args (``Request.worker_args`` plus ``kind``, ``id``, ``threads``,
  ``device``); EOF means "no more jobs": the worker exits 0 once idle.
* the file descriptor ``args["outcome_fd"]`` (a pipe the driver reads): one JSON object per line,
  ``{"event": "ready", "pid": ...}`` once imported, then ``{"event": "outcome", "id": ..., "outcome": ...}`` after
  each job (``done``, ``skipped``, ``failed``, ``interrupted``, ``busy``).
* while a job runs, file descriptors 1 and 2 point at its run directory's ``stdout.log`` (appended, as a per-job
  process had it); between jobs at the worker's own log (``args["log"]``, stdout when absent).
* exit codes: 0 after EOF, 3 stopped by a signal (the running job checkpointed and reported ``interrupted``),
  1 a fault of the worker itself.

``python -m mpbench.worker '<json args>'`` executes a single job and exits with its outcome (``EXIT``).

Isolation: before each job the worker clears the decoded-dataset cache unless the job reads the same datasets as
the previous one (the cache is read-only and keyed by name, root and split; so at most one job's datasets are
held), and after each job it puts back what the job may have changed (:class:`ProcessState`): torch's RNG (and
Python's, numpy's) as they were when the worker started, torch's thread count, deterministic-algorithm, default
dtype/device, grad and anomaly modes, cuDNN/TF32/matmul-precision flags, global module hooks, timm's layer config,
signal handlers, environment variables and the working directory; a torch.distributed group left behind is
destroyed, and garbage is collected (CUDA's cache emptied, the C heap trimmed). Each job still seeds itself from
its spec (``train.seed_everything``), so its numbers do not depend on what ran before in the same process.

A worker never outlives its driver (``args["parent"]``, the pool launcher's pid): on Linux the kernel sends it
SIGTERM when the driver dies (``PR_SET_PDEATHSIG``), and a watcher thread sends it one itself when its parent
changes (the driver died before ``prctl``, or elsewhere than Linux). SIGTERM, like every stop signal, makes the run
checkpoint at its next step and stop (``mpbench.runner.StopFlag``); an idle worker exits at once.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

EXIT = {"done": 0, "skipped": 0, "failed": 1, "interrupted": 3, "busy": 4}
OUTCOME = {v: k for k, v in EXIT.items() if k != "skipped"}
PR_SET_PDEATHSIG = 1
PARENT_POLL_S = 1.0
IDLE_POLL_S = 0.5


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
    """Execute one job of its worker args (``Request.worker_args`` plus ``kind``, ``id``, ``threads``, ``device``)."""
    from mpbench.runner import Execution, execute

    return execute(Path(args["results"]), args["kind"], args["id"], Execution.from_args(args),
                   force=bool(args.get("force")))


# --- isolation between the jobs of one process ----------------------------------------------------------------

_TORCH_FLAGS = (   # (module path, attribute) pairs of torch.backends flags restored after every job
    ("cudnn", "enabled"), ("cudnn", "benchmark"), ("cudnn", "deterministic"), ("cudnn", "allow_tf32"),
    ("cuda.matmul", "allow_tf32"), ("cuda.matmul", "allow_fp16_reduced_precision_reduction"),
    ("cuda.matmul", "allow_bf16_reduced_precision_reduction"), ("mkldnn", "enabled"),
)
_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
               "_global_backward_pre_hooks", "_global_forward_hooks_always_called",
               "_global_forward_hooks_with_kwargs", "_global_module_registration_hooks",
               "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")
_TIMM_FLAGS = ("_EXPORTABLE", "_SCRIPTABLE", "_NO_JIT", "_NO_ACTIVATION_JIT", "_USE_FUSED_ATTN", "_USE_REENTRANT_CKPT")
_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                             signal.SIGALRM, signal.SIGCHLD, signal.SIGPIPE) if s is not None)


def _backend(path: str) -> Any:
    import torch.backends

    obj: Any = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class ProcessState:
    """What one job may change in its process and the next job must not see; :meth:`capture` once (when the
    process starts), :meth:`restore` after every job."""

    def __init__(self) -> None:
        import random

        import numpy as np
        import torch
        import torch.nn.modules.module as module

        self.threads = torch.get_num_threads()
        self.deterministic = (torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled())
        self.dtype = torch.get_default_dtype()
        self.device = torch.get_default_device() if hasattr(torch, "get_default_device") else None
        self.grad = torch.is_grad_enabled()
        self.anomaly = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())
        self.matmul_precision = torch.get_float32_matmul_precision()
        self.flags = {}
        for path, name in _TORCH_FLAGS:
            with contextlib.suppress(Exception):     # a flag this torch build does not have
                self.flags[(path, name)] = getattr(_backend(path), name)
        self.hooks = {name: dict(getattr(module, name)) for name in _HOOK_DICTS if hasattr(module, name)}
        self.full_backward = getattr(module, "_global_is_full_backward_hook", None)
        self.timm = self._timm_flags()
        self.rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        self.seed = torch.initial_seed()
        self.signals = {s: signal.getsignal(s) for s in _SIGNALS}
        self.environ = dict(os.environ)
        self.cwd = os.getcwd()

    @classmethod
    def capture(cls) -> "ProcessState":
        return cls()

    @staticmethod
    def _timm_flags() -> dict[str, Any]:
        try:
            import timm.layers.config as cfg
        except ImportError:
            return {}
        return {n: getattr(cfg, n) for n in _TIMM_FLAGS if hasattr(cfg, n)}

    def restore(self) -> None:
        import random

        import numpy as np
        import torch
        import torch.nn.modules.module as module

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(self.deterministic[0], warn_only=self.deterministic[1])
        torch.set_default_dtype(self.dtype)
        if self.device is not None and torch.get_default_device() != self.device:
            torch.set_default_device(self.device)
        torch.set_grad_enabled(self.grad)
        torch.set_anomaly_enabled(*self.anomaly)
        torch.set_float32_matmul_precision(self.matmul_precision)
        for (path, name), value in self.flags.items():
            with contextlib.suppress(Exception):
                setattr(_backend(path), name, value)
        for name, hooks in self.hooks.items():
            current = getattr(module, name)
            current.clear()
            current.update(hooks)
        if hasattr(module, "_global_is_full_backward_hook"):
            module._global_is_full_backward_hook = self.full_backward
        if self.timm:
            import timm.layers.config as cfg

            for name, value in self.timm.items():
                setattr(cfg, name, value)
        torch.set_rng_state(self.rng[0])
        np.random.set_state(self.rng[1])
        random.setstate(self.rng[2])
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(self.seed)   # as a fresh process's generators start
        for sig, handler in self.signals.items():
            if handler is not None and signal.getsignal(sig) is not handler:
                with contextlib.suppress(OSError, ValueError, TypeError):
                    signal.signal(sig, handler)
        if dict(os.environ) != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        if os.getcwd() != self.cwd:
            os.chdir(self.cwd)
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        _trim_heap()


def settle() -> None:
    """Once the slow imports are done: collect, then exempt what exists now (modules, classes) from every later
    collection (``gc.freeze``), so the collection after each job costs milliseconds instead of a tenth of a
    second."""
    gc.collect()
    gc.freeze()


def _trim_heap() -> None:
    """Give the freed C heap back to the kernel (the next job's peak is its own; ``mpbench.malloc`` keeps memory
    only within a job)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)


class DatasetCache:
    """The decoded-dataset cache (``mpbench.data``) across the jobs of one process: kept while consecutive jobs
    read the same datasets from the same root, cleared otherwise."""

    def __init__(self) -> None:
        self.last: tuple | None = None

    def before(self, args: dict) -> None:
        from mpbench.data import clear_cache

        try:
            from mpbench.jobs import JOB_KINDS
            from mpbench.store import RunDir

            spec = RunDir(Path(args["results"]), args["kind"], args["id"]).read_config()["spec"]
            key: tuple | None = (str(args.get("data_root")), tuple(JOB_KINDS.get(args["kind"]).datasets(spec)))
        except Exception:  # noqa: BLE001 - the job itself reports an unreadable config
            key = None
        if key is None or key != self.last:
            clear_cache()
        self.last = key


@contextlib.contextmanager
def job_output(log: Path) -> Iterator[None]:
    """File descriptors 1 and 2 (Python's and C's output alike) appended to ``log`` while the block runs."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        fd = None                                # no run directory: the job's own error says so
    try:
        if fd is not None:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved:
            os.close(f)


def run_isolated(args: dict, state: ProcessState, cache: DatasetCache, log: Path | None = None) -> str:
    """One job of a multi-job process: its output to ``log`` (when given), the process state put back after."""
    cache.before(args)
    try:
        with job_output(log) if log is not None else contextlib.nullcontext():
            return run_job(args)
    finally:
        state.restore()


# --- the persistent pool worker --------------------------------------------------------------------------------

class _Lines:
    """Lines of a file descriptor, read without blocking past a stop signal (``stop``: an Event)."""

    def __init__(self, fd: int, stop: threading.Event) -> None:
        self.fd, self.stop, self.buf = fd, stop, b""

    def next(self) -> str | None:
        """The next line, or None at EOF or once ``stop`` is set."""
        while b"\n" not in self.buf:
            if self.stop.is_set():
                return None
            ready, _, _ = select.select([self.fd], [], [], IDLE_POLL_S)
            if not ready:
                continue
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def serve(args: dict) -> int:
    """A persistent pool worker (see the module docstring); returns its exit code."""
    from mpbench.runner import StopFlag

    out_fd = int(args["outcome_fd"])

    def send(msg: dict) -> None:
        try:
            os.write(out_fd, (json.dumps(msg) + "\n").encode())
        except OSError:                           # the driver is gone: the parent watch stops us
            pass

    with StopFlag() as stop:                      # the whole life of the worker, not only a run's training loop
        watch_parent(int(args.get("parent") or os.getppid()))
        if stop.flag.is_set():
            return EXIT["interrupted"]
        import torch  # noqa: F401  (the slow imports, once)

        import mpbench.models  # noqa: F401
        import mpbench.train  # noqa: F401
        from mpbench.provenance import git_info

        git_info()                                # the checkout this process imported, not a later one
        state = ProcessState.capture()
        settle()
        cache = DatasetCache()
        send({"event": "ready", "pid": os.getpid()})
        lines = _Lines(sys.stdin.fileno(), stop.flag)
        while True:
            line = lines.next()
            if line is None:
                break
            if not line.strip():
                continue
            job = {**args, **json.loads(line)}
            try:
                outcome = run_isolated(job, state, cache, _job_log(job))
            except KeyboardInterrupt:             # a second SIGINT: the runner recorded the run as pending
                send({"event": "outcome", "id": job["id"], "outcome": "interrupted"})
                return EXIT["interrupted"]
            send({"event": "outcome", "id": job["id"], "outcome": outcome})
        return EXIT["interrupted"] if stop.flag.is_set() else 0


def _job_log(job: dict) -> Path:
    """The run directory's ``stdout.log`` of a job's worker args."""
    from mpbench.store import RunDir

    return RunDir(Path(job["results"]), job["kind"], job["id"]).path / "stdout.log"


def main() -> None:
    serving = len(sys.argv) > 2 and sys.argv[1] == "--serve"
    args = json.loads(sys.argv[2] if serving else sys.argv[1])
    parent = int(args.get("parent") or os.getppid())
    die_with_parent()                              # before the slow imports: until StopFlag, SIGTERM just ends us
    if serving:
        try:
            sys.exit(serve(args))
        except KeyboardInterrupt:
            sys.exit(EXIT["interrupted"])
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
