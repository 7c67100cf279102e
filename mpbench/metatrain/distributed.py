"""Distributed meta-training: ``world_size`` ``torch.distributed`` ranks on one node (``metaperturb.md`` §2).

The release runs one process per task with gradient all-reduce. Here rank ``r`` owns the tasks ``k`` with
``k % world == r`` (gloo on CPU, NCCL when every rank has its own GPU) and the all-reduce sums the (tasks x 84)
matrix in which every rank fills only its own rows, so the reduction is exact and both modes compute the same
phi. The world size is an execution setting (env ``MPBENCH_METATRAIN_WORLD``), not part of the artifact's identity.
"""
from __future__ import annotations

import os
import signal
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from mpbench.errors import RunFailed, UsageError
from mpbench.metatrain.loop import Control, run_steps
from mpbench.metatrain.tasks import Task, source_tasks
from mpbench.metatrain.trainer import MetaTrainer
from mpbench.train import Interrupted, RunHooks

WORLD_ENV = "MPBENCH_METATRAIN_WORLD"
TIMEOUT_ENV = "MPBENCH_METATRAIN_TIMEOUT"


def world_size_from_env() -> int:
    raw = os.environ.get(WORLD_ENV, "").strip()
    if not raw:
        return 1
    try:
        w = int(raw)
    except ValueError:
        raise UsageError(f"{WORLD_ENV}={raw!r} must be a positive integer") from None
    if w < 1:
        raise UsageError(f"{WORLD_ENV}={raw!r} must be a positive integer")
    return w


def backend_for(device: torch.device, world: int) -> str:
    return "nccl" if device.type == "cuda" and torch.cuda.device_count() >= world else "gloo"


def _rank_device(device: torch.device, rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    return torch.device("cuda", ((device.index or 0) + rank) % max(torch.cuda.device_count(), 1))


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 1800)))


def _join(trainer: MetaTrainer, backend: str, store) -> Control:
    """Initialise the default group on ``store``, give ``trainer`` the gradient all-reduce; returns the control."""
    import torch.distributed as dist

    device = trainer.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=trainer.rank, world_size=trainer.world, timeout=_timeout())
    ctrl = dist.new_group(backend="gloo", timeout=_timeout()) if backend != "gloo" else None

    def allreduce(rows: torch.Tensor) -> torch.Tensor:
        t = rows.to(device) if backend == "nccl" else rows
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    trainer.comm = allreduce
    return Control(trainer.world, ctrl)


def _run_rank(trainer: MetaTrainer, backend: str, store, steps: int, checkpoint_every: int,
              hooks: RunHooks | None = None, save=None, progress=None) -> None:
    """Join the group, meta-train to ``steps``, leave the group."""
    import torch.distributed as dist

    ctl = _join(trainer, backend, store)
    try:
        run_steps(trainer, steps, ctl, checkpoint_every, hooks, save, progress)
    finally:
        dist.destroy_process_group()


def _watch_parent(parent: int) -> None:
    """Exit this rank if the process that started it is gone (no orphan waits out a collective's timeout)."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="mpbench-parent-watch").start()


def worker_main(args_file: str) -> None:
    """A rank > 0 of a distributed run (``python -c``, started by :func:`train_distributed`); rank 0 runs in the
    calling process, owns the hooks, and decides when everybody stops."""
    import torch.distributed as dist

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    args = torch.load(args_file, map_location="cpu", weights_only=True)
    _watch_parent(int(args["parent"]))
    rank, world = int(args["rank"]), int(args["world"])
    torch.set_num_threads(int(args["threads"]))
    device = _rank_device(torch.device(args["device"]), rank)
    store = dist.TCPStore("127.0.0.1", int(args["port"]), world, False, timeout=_timeout())
    spec = args["spec"]
    tasks, _ = source_tasks(spec, Path(args["data_root"]))
    trainer = MetaTrainer(spec, tasks, int(args["run_seed"]), device, rank, world, state=args["resume"])
    store.set(f"ready/{rank}", "1")
    _run_rank(trainer, args["backend"], store, int(spec["steps"]), int(args["checkpoint_every"]))


def _wait_ready(store, world: int, procs: list) -> None:
    """Wait until ranks 1..world-1 have built their trainers; fail at once if one of them died."""
    keys = [f"ready/{r}" for r in range(1, world)]
    deadline = time.monotonic() + _timeout().total_seconds()
    while not store.check(keys):
        dead = [(r + 1, p.returncode) for r, p in enumerate(procs) if p.poll() is not None]
        if dead:
            raise RunFailed(f"distributed meta-training: rank(s) {dead} (rank, exit code) failed before the "
                            f"rendezvous; their traceback is in this job's output")
        if time.monotonic() > deadline:
            raise RunFailed("distributed meta-training: ranks did not reach the rendezvous in time")
        time.sleep(0.05)


def train_distributed(spec: dict[str, Any], data_root: Path, tasks: list[Task], run_seed: int,
                      device: torch.device, world: int, checkpoint_every: int, hooks: RunHooks, save, progress,
                      resume: dict[str, Any] | None) -> MetaTrainer:
    """Rank 0 here, ranks 1..world-1 as child processes (``python -c``, so no ``__main__`` guard is needed in the
    caller), rendezvous on a TCPStore on 127.0.0.1. A rank that dies before the rendezvous fails the run at once;
    one that dies later breaks the next collective."""
    import subprocess
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        raise UsageError(f"{WORLD_ENV}={world}: this process already belongs to a torch.distributed group; "
                         "run the metatrain stage in its own process")
    backend = backend_for(device, world)
    if sys.platform.startswith("linux"):      # one node: loopback, whatever the hostname resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", 0, world, True, timeout=_timeout(), wait_for_workers=False)
    threads = max(1, torch.get_num_threads() // world)
    tmp = Path(tempfile.mkdtemp(prefix="mpbench-metatrain-"))
    procs: list[subprocess.Popen] = []
    old_threads = torch.get_num_threads()
    ok = False
    try:
        for r in range(1, world):
            args_file = tmp / f"rank{r}.pt"
            torch.save({"spec": spec, "data_root": str(data_root), "device": str(device), "run_seed": int(run_seed),
                        "threads": threads, "checkpoint_every": int(checkpoint_every), "resume": resume,
                        "rank": r, "world": world, "backend": backend, "port": int(store.port),
                        "parent": os.getpid()}, args_file)
            code = "import sys; from mpbench.metatrain.distributed import worker_main; worker_main(sys.argv[1])"
            procs.append(subprocess.Popen([sys.executable, "-c", code, str(args_file)]))
        torch.set_num_threads(threads)
        trainer = MetaTrainer(spec, tasks, run_seed, _rank_device(device, 0), 0, world, state=resume)
        _wait_ready(store, world, procs)
        try:
            _run_rank(trainer, backend, store, int(spec["steps"]), checkpoint_every, hooks, save, progress)
            ok = True
        except Interrupted:
            ok = True
            raise
        except Exception as e:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                raise RunFailed(f"distributed meta-training failed: exit codes of ranks 1..{world - 1}: {codes} "
                                f"(their traceback is in this job's output); rank 0: {type(e).__name__}: {e}"
                                ) from e
            raise
    finally:
        torch.set_num_threads(old_threads)
        for p in procs:
            try:
                p.wait(timeout=60 if ok else 2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in tmp.glob("*"):
            f.unlink(missing_ok=True)
        tmp.rmdir()
        del store
    return trainer
