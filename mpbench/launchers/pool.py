"""Local worker processes: ``launcher.devices`` (cpu, auto, or GPU ids) x ``launcher.slots`` per device.

Each slot is ONE persistent worker process that runs job after job: forked from the driver before the first wave
where that is safe (:mod:`mpbench.fork`: no start-up at all), else ``python -m mpbench.worker --serve``, which
imports torch and timm once; the driver writes each job as a JSON line to the worker's stdin and reads its outcome
from a pipe of its own (protocol: ``mpbench.worker``), so a slot is never idle while a job waits. A worker gets its
own ``CUDA_VISIBLE_DEVICES`` and thread count (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``), runs in its own session (so
a terminal's Ctrl-C reaches only this driver), writes each job's output to ``stdout.log`` in its run directory
(its own output between jobs goes to ``<results>/pool/slot<N>.log``), and puts its process state back after every
job (``mpbench.worker.ProcessState``); the parent never initialises CUDA. The workers outlive a wave: the next wave
of the same ``mpbench run`` (stages, then runs, then retries) reuses them; they exit when the invocation's
``Request`` is gone (or the driver exits).

A worker that dies (killed, segfault) is replaced for the next job; its job is recorded as failed (transient), so
``run_plan`` retries it (``launcher.max_retries``).

Stopping: Ctrl-C, SIGTERM or SIGHUP of the driver (``mpbench.runner.StopFlag``) is forwarded to every worker as
SIGTERM; busy ones checkpoint at their next step, report, and exit, idle ones exit at once, no further job starts,
and the driver waits for them (one still running ``launcher.stale_after_s`` later is killed), then raises
:class:`mpbench.runner.Stopped` (``mpbench run`` exits 128 + the signal's number). A second Ctrl-C kills the workers
at once; their runs are recorded as pending, never running. A worker whose driver dies stops by itself
(``mpbench.worker``).
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from mpbench.launchers import Request, device_slots, job_steps, needs_work, outcome_detail, register_launcher
from mpbench import fork
from mpbench.launchers.local import resume_from, stop_summary, stopped_detail
from mpbench.plan import Job
from mpbench.runner import StopFlag, Stopped, signal_name
from mpbench.store import RunDir

# jobs a worker process runs before it is replaced: 0 = no limit (persistent); 1 = a fresh process per job, the
# behaviour before persistent workers (``mpbench bench makespan --per-job-process`` measures it)
JOBS_PER_WORKER = 0
POLL_S = 0.3
CLOSE_WAIT_S = 10.0


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _mark_unsaved(rd: RunDir, how: str) -> None:
    """A worker that died before recording its stop: its run is pending again, never left ``running``."""
    if rd.state() == "running":
        rd.mark_unsaved(how)


@dataclass
class _Worker:
    """One slot's process, the read end of its outcome pipe, and the job it runs (None: idle)."""

    slot: int
    proc: subprocess.Popen | fork.ForkedProcess
    fd: int
    job: Job | None = None
    served: int = 0
    buf: bytes = b""
    events: list[dict] = field(default_factory=list)

    def send(self, args: dict) -> bool:
        """Hand it a job; False when it is gone (the job was not started)."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(args) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def read(self) -> None:
        """Collect the events it has written so far (non-blocking)."""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                break
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def end_input(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()

    def close_fd(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1


class _Pool:
    """The workers of one ``mpbench run`` invocation, one per slot, started on demand."""

    def __init__(self, key: tuple, slots: list[str | None], threads: int, results: Path) -> None:
        self.key, self.slots, self.threads, self.results = key, slots, threads, results
        self.workers: dict[int, _Worker] = {}

    def spawn(self, slot: int) -> _Worker:
        """Start slot ``slot``'s worker: forked from this driver where that is safe (``mpbench.fork``),
        else a fresh ``python -m mpbench.worker --serve``; its slot log says which, and why."""
        gpu = self.slots[slot]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                   CUDA_VISIBLE_DEVICES=gpu if gpu is not None else "")
        why_not_fork = "a fresh process per job" if JOBS_PER_WORKER == 1 else fork.unavailable(gpu is not None)
        log_path = self.results / "pool" / f"slot{slot}.log"
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "ab")
        except OSError:
            log = open(os.devnull, "ab")
        log.write((f"{time.strftime('%Y-%m-%d %H:%M:%S')} slot {slot}: " +
                   ("worker forked from the driver\n" if why_not_fork is None else
                    f"worker started as python -m mpbench.worker (not forked: {why_not_fork})\n")).encode())
        log.flush()
        r, w = os.pipe()
        try:
            args = {"parent": os.getpid(), "outcome_fd": w}
            if why_not_fork is None:
                proc: subprocess.Popen | fork.ForkedProcess = fork.fork_worker(
                    args, env, self.threads, log.fileno(), [r, *self._driver_fds()])
            else:
                proc = subprocess.Popen([sys.executable, "-m", "mpbench.worker", "--serve", json.dumps(args)],
                                        env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                        pass_fds=(w,), start_new_session=True)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
            log.close()
        os.set_blocking(r, False)
        worker = _Worker(slot, proc, r)
        self.workers[slot] = worker
        return worker

    def _driver_fds(self) -> list[int]:
        """This driver's ends of the other workers' pipes (a forked worker closes them)."""
        fds = []
        for w in self.workers.values():
            fds.append(w.fd)
            with contextlib.suppress(ValueError, AttributeError):
                fds.append(w.proc.stdin.fileno())
        return [fd for fd in fds if fd >= 0]

    def start(self, n: int) -> None:
        """Start the first ``n`` slots' workers now (they import, or are forked, before the first job)."""
        for slot in range(min(n, len(self.slots))):
            if slot not in self.workers:
                self.spawn(slot)

    def free_slot(self) -> int | None:
        """A slot for the next job: an idle live worker's first, else one without a worker."""
        for slot, w in self.workers.items():
            if w.job is None and w.proc.poll() is None and not (JOBS_PER_WORKER and w.served >= JOBS_PER_WORKER):
                return slot
        for slot in range(len(self.slots)):
            if slot not in self.workers:
                return slot
        return None

    def remove(self, worker: _Worker) -> None:
        worker.end_input()
        worker.close_fd()
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]

    def signal_all(self, sig: int) -> None:
        for w in self.workers.values():
            _signal_group(w.proc, sig)

    def close(self, sig: int | None = None) -> None:
        """End every worker: EOF on its stdin (or ``sig``), then wait; a worker still alive is killed."""
        for w in self.workers.values():
            w.end_input()
            if sig is not None:
                _signal_group(w.proc, sig)
        deadline = time.time() + CLOSE_WAIT_S
        for w in list(self.workers.values()):
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                _signal_group(w.proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(timeout=5)
            w.close_fd()
        self.workers.clear()


_POOL: dict[str, object] = {}          # "pool": the current _Pool, "req": a weak reference to its Request


def _pool_for(req: Request, slots: list[str | None], threads: int) -> _Pool:
    """The invocation's pool: reused across its waves and retries, replaced when anything it was started with
    changed; closed when the Request is collected (or at exit)."""
    key = (tuple(slots), threads, sys.executable, os.getcwd(), tuple(sorted(os.environ.items())))
    pool = _POOL.get("pool")
    owner = _POOL.get("req")
    if isinstance(pool, _Pool):
        if pool.key == key and callable(owner) and owner() is req and JOBS_PER_WORKER == 0:
            return pool
        _discard(pool)
    pool = _Pool(key, slots, threads, Path(req.results))
    _POOL.update(pool=pool, req=weakref.ref(req))
    weakref.finalize(req, _discard, pool)
    return pool


def _discard(pool: _Pool, sig: int | None = None) -> None:
    pool.close(sig)
    if _POOL.get("pool") is pool:
        _POOL.clear()


def _layout(req: Request) -> tuple[list[str | None], int]:
    """The slots (a GPU id or None each) and the threads of each worker."""
    slots = device_slots(req.launcher.devices, req.launcher.slots)
    return slots, int(req.launcher.threads or max(1, (os.cpu_count() or 1) // len(slots)))


def warm_up(req: Request) -> None:
    """Start as many workers as there are jobs to run (at most one per slot) before the first wave, while the
    driver runs no other thread, so they can be forked from it (``mpbench.fork``)."""
    todo = sum(1 for job in req.plan.jobs if needs_work(job, req))
    if not todo:
        return
    slots, threads = _layout(req)
    if any(fork.unavailable(gpu is not None) is None for gpu in slots):
        fork.preload()
    _pool_for(req, slots, threads).start(todo)


@register_launcher("pool", "local worker processes, launcher.slots per device (cpu or GPU ids)",
                   validate=lambda launcher: device_slots(launcher.devices, launcher.slots) and None,
                   warm_up=warm_up)
def launch_pool(req: Request, jobs: list[Job]) -> dict[str, str]:
    slots, threads = _layout(req)
    pool = _pool_for(req, slots, threads)
    base = req.worker_args()
    grace_s = float(req.launcher.stale_after_s)
    queue = list(jobs)
    outcomes: dict[str, str] = {}
    killed: list[str] = []
    prog = req.progress
    stopping_since: float | None = None

    def busy() -> list[_Worker]:
        return [w for w in pool.workers.values() if w.job is not None]

    def finish(worker: _Worker, outcome: str | None, code: int | None) -> None:
        """Record the outcome of ``worker``'s job; None: it died without reporting one (``code``: its exit)."""
        job, worker.job = worker.job, None
        if job is None:
            return
        rd = job.dir(req.results)
        if outcome is None:
            reason = f"worker exited with code {code}" + (f" (signal {-code})" if code is not None and code < 0
                                                          else "")
            if rd.is_done and rd.status().get("pid") == worker.proc.pid:
                outcome = "done"                   # it died after recording the result
            elif stopping_since is not None:       # died while stopping, before recording its stop
                outcome = "interrupted"
                _mark_unsaved(rd, reason)
            else:                                  # killed, segfault: record why for it
                outcome = "failed"
                if rd.state() != "failed":
                    rd.update_status(state="failed", error=reason, transient=True)
        outcomes[job.id] = outcome
        if prog:
            detail = stopped_detail(rd) if outcome == "interrupted" else outcome_detail(req, job, outcome)
            prog.finished(job.id, outcome, detail)

    def collect(worker: _Worker) -> None:
        worker.read()
        events, worker.events = worker.events, []
        for ev in events:
            if ev.get("event") == "outcome" and worker.job is not None and ev.get("id") == worker.job.id:
                finish(worker, str(ev.get("outcome")), None)
                if JOBS_PER_WORKER and worker.served >= JOBS_PER_WORKER:
                    worker.end_input()             # a fresh process for the next job

    with StopFlag() as stop:
        try:
            while queue or busy():
                if stop.flag.is_set() and stopping_since is None:
                    stopping_since = time.time()
                    queue.clear()
                    n = len(busy())
                    pool.signal_all(signal.SIGTERM)       # busy ones checkpoint, idle ones just exit
                    if n and prog:
                        prog.note(f"stopping ({signal_name(stop.signum or 0)}): {n} worker(s) checkpoint "
                                  f"and exit; Ctrl-C again to kill them now")
                while queue and stopping_since is None and not (req.fail_fast and "failed" in outcomes.values()):
                    slot = pool.free_slot()
                    if slot is None:
                        break
                    worker = pool.workers.get(slot) or pool.spawn(slot)
                    job = queue[0]
                    args = {**base, "kind": job.kind, "id": job.id, "threads": threads,
                            "device": "cuda:0" if slots[slot] is not None else "cpu"}
                    if not worker.send(args):      # it died while idle: replace it, the job never started
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            worker.proc.wait(timeout=5)
                        pool.remove(worker)
                        continue
                    queue.pop(0)
                    worker.job, worker.served = job, worker.served + 1
                    if prog:
                        prog.started(job.id, job_steps(job), resume_from(req, job))
                if req.fail_fast and "failed" in outcomes.values():
                    queue.clear()
                live = [w for w in pool.workers.values() if w.fd >= 0]
                if live:
                    with contextlib.suppress(InterruptedError, OSError, ValueError):
                        select.select([w.fd for w in live], [], [], POLL_S)
                else:
                    time.sleep(POLL_S)
                for worker in list(pool.workers.values()):
                    collect(worker)
                    code = worker.proc.poll()
                    if code is not None:           # exited: anything it wrote before is in the pipe
                        collect(worker)
                        finish(worker, None, code)
                        pool.remove(worker)
                        continue
                    if prog and worker.job is not None:
                        st = worker.job.dir(req.results).status()
                        if st.get("step") is not None and st.get("state") == "running":
                            prog.step(worker.job.id, int(st.get("step", 0)), int(st.get("total") or 1))
                if stopping_since is not None and busy() and time.time() - stopping_since > grace_s:
                    for worker in busy():
                        if worker.job is not None and worker.job.id not in killed:
                            killed.append(worker.job.id)
                            _signal_group(worker.proc, signal.SIGKILL)
        except KeyboardInterrupt:                  # a second Ctrl-C: kill the workers now
            with contextlib.suppress(ValueError):            # (not the main thread: no handler raised it)
                signal.signal(signal.SIGINT, signal.SIG_IGN)   # until StopFlag restores it: finish this cleanup
            running = busy()
            pool.signal_all(signal.SIGKILL)
            for worker in running:
                worker.proc.wait()
                assert worker.job is not None
                _mark_unsaved(worker.job.dir(req.results), "killed by a second Ctrl-C")
            _discard(pool, signal.SIGKILL)
            raise
        if stop.flag.is_set():
            _discard(pool, signal.SIGTERM)         # idle ones too: no worker outlives a stopped driver
    if stop.flag.is_set():
        raise Stopped(stop.signum or 0, stop_summary(req, jobs, outcomes, tuple(killed)))
    return outcomes
