"""Local worker processes: ``launcher.devices`` (cpu, auto, or GPU ids) x ``launcher.slots`` per device.

Each child gets its own ``CUDA_VISIBLE_DEVICES`` and thread count, runs in its own session (so a terminal's
Ctrl-C reaches only this driver), and writes ``stdout.log`` in its run directory; the parent never initialises CUDA.

Stopping: Ctrl-C, SIGTERM or SIGHUP of the driver (``mpbench.runner.StopFlag``) is forwarded to every worker as
SIGTERM; they checkpoint at their next step and exit, no further job starts, and the driver waits for them (one
still running ``launcher.stale_after_s`` later is killed), then raises :class:`mpbench.runner.Stopped`
(``mpbench run`` exits 128 + the signal's number). A second Ctrl-C kills the workers at once; their runs are
recorded as pending, never running. A worker whose driver dies stops by itself (``mpbench.worker``).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

from mpbench.launchers import Request, device_slots, job_steps, outcome_detail, register_launcher
from mpbench.launchers.local import resume_from, stop_summary, stopped_detail
from mpbench.plan import Job
from mpbench.runner import StopFlag, Stopped, signal_name
from mpbench.store import RunDir
from mpbench.worker import OUTCOME


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _mark_unsaved(rd: RunDir, how: str) -> None:
    """A worker that died before recording its stop: its run is pending again, never left ``running``."""
    if rd.state() == "running":
        then = "resumes from its last checkpoint" if rd.checkpoint.exists() else "restarts from step 0"
        rd.update_status(state="pending", error=None, checkpoint_step=None,
                         note=f"interrupted before its checkpoint ({how}); {then}")


@register_launcher("pool", "local worker processes, launcher.slots per device (cpu or GPU ids)",
                   validate=lambda launcher: device_slots(launcher.devices, launcher.slots) and None)
def launch_pool(req: Request, jobs: list[Job]) -> dict[str, str]:
    slots = device_slots(req.launcher.devices, req.launcher.slots)
    threads = req.launcher.threads or max(1, (os.cpu_count() or 1) // len(slots))
    base = {**req.worker_args(), "parent": os.getpid()}
    grace_s = float(req.launcher.stale_after_s)
    queue = list(jobs)
    running: dict[int, tuple[subprocess.Popen, Job]] = {}
    outcomes: dict[str, str] = {}
    killed: list[str] = []
    free = list(range(len(slots)))
    prog = req.progress
    stopping_since: float | None = None
    with StopFlag() as stop:
        try:
            while queue or running:
                if stop.flag.is_set() and stopping_since is None:
                    stopping_since = time.time()
                    queue.clear()
                    for proc, _ in running.values():
                        _signal_group(proc, signal.SIGTERM)
                    if running and prog:
                        prog.note(f"stopping ({signal_name(stop.signum or 0)}): {len(running)} worker(s) checkpoint "
                                  f"and exit; Ctrl-C again to kill them now")
                while queue and free and not (req.fail_fast and "failed" in outcomes.values()):
                    slot = free.pop(0)
                    job = queue.pop(0)
                    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                    gpu = slots[slot]
                    env["CUDA_VISIBLE_DEVICES"] = gpu if gpu is not None else ""
                    args = {**base, "kind": job.kind, "id": job.id, "threads": threads,
                            "device": "cuda:0" if gpu is not None else "cpu"}
                    rd = job.dir(req.results)
                    if prog:
                        prog.started(job.id, job_steps(job), resume_from(req, job))
                    log = open(rd.path / "stdout.log", "ab")
                    proc = subprocess.Popen([sys.executable, "-m", "mpbench.worker", json.dumps(args)], env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                    log.close()
                    running[slot] = (proc, job)
                if req.fail_fast and "failed" in outcomes.values():
                    queue.clear()
                time.sleep(0.3)
                for slot, (proc, job) in list(running.items()):
                    rd = job.dir(req.results)
                    st = rd.status()
                    if prog and st.get("step") is not None and st.get("state") == "running":
                        prog.step(job.id, int(st.get("step", 0)), int(st.get("total") or 1))
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[slot]
                    free.append(slot)
                    outcome = OUTCOME.get(code, "failed")
                    if outcome == "failed" and st.get("state") != "failed":
                        reason = f"worker exited with code {code}" + (f" (signal {-code})" if code < 0 else "")
                        if stopping_since is not None:     # died while stopping, before recording its stop
                            outcome = "interrupted"
                            _mark_unsaved(rd, reason)
                        else:                              # killed, segfault: record why for it
                            rd.update_status(state="failed", error=reason, transient=True)
                    outcomes[job.id] = outcome
                    if prog:
                        detail = stopped_detail(rd) if outcome == "interrupted" else outcome_detail(req, job, outcome)
                        prog.finished(job.id, outcome, detail)
                if stopping_since is not None and running and time.time() - stopping_since > grace_s:
                    for proc, job in running.values():
                        killed.append(job.id)
                        _signal_group(proc, signal.SIGKILL)
        except KeyboardInterrupt:                  # a second Ctrl-C: kill the workers now
            with contextlib.suppress(ValueError):            # (not the main thread: no handler raised it)
                signal.signal(signal.SIGINT, signal.SIG_IGN)   # until StopFlag restores it: finish this cleanup
            for proc, _ in running.values():
                _signal_group(proc, signal.SIGKILL)
            for proc, job in running.values():
                proc.wait()
                _mark_unsaved(job.dir(req.results), "killed by a second Ctrl-C")
            raise
    if stop.flag.is_set():
        raise Stopped(stop.signum or 0, stop_summary(req, jobs, outcomes, tuple(killed)))
    return outcomes
