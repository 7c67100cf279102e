"""Local worker processes: ``launcher.devices`` (cpu, auto, or GPU ids) x ``launcher.slots`` per device.

Each child gets its own ``CUDA_VISIBLE_DEVICES`` and thread count, runs in its own process group, and writes
``stdout.log`` in its run directory; the parent never initialises CUDA. Ctrl-C sends SIGTERM to the children
(they checkpoint and stop), then SIGKILL after a grace period.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from mpbench.launchers import Request, device_slots, job_steps, outcome_detail, register_launcher
from mpbench.plan import Job
from mpbench.worker import OUTCOME


@register_launcher("pool", "local worker processes, launcher.slots per device (cpu or GPU ids)",
                   validate=lambda launcher: device_slots(launcher.devices, launcher.slots) and None)
def launch_pool(req: Request, jobs: list[Job]) -> dict[str, str]:
    slots = device_slots(req.launcher.devices, req.launcher.slots)
    threads = req.launcher.threads or max(1, (os.cpu_count() or 1) // len(slots))
    base = req.worker_args()
    queue = list(jobs)
    running: dict[int, tuple[subprocess.Popen, Job]] = {}
    outcomes: dict[str, str] = {}
    free = list(range(len(slots)))
    prog = req.progress
    try:
        while queue or running:
            while queue and free and not (req.fail_fast and "failed" in outcomes.values()):
                slot = free.pop(0)
                job = queue.pop(0)
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                gpu = slots[slot]
                env["CUDA_VISIBLE_DEVICES"] = gpu if gpu is not None else ""
                args = {**base, "kind": job.kind, "id": job.id, "threads": threads,
                        "device": "cuda:0" if gpu is not None else "cpu"}
                rd = job.dir(req.results)
                log = open(rd.path / "stdout.log", "ab")
                proc = subprocess.Popen([sys.executable, "-m", "mpbench.worker", json.dumps(args)], env=env,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                log.close()
                running[slot] = (proc, job)
                if prog:
                    prog.started(job.id, job_steps(job))
            if req.fail_fast and "failed" in outcomes.values():
                queue.clear()
            time.sleep(0.3)
            for slot, (proc, job) in list(running.items()):
                st = job.dir(req.results).status()
                if prog and st.get("step") is not None:
                    prog.step(job.id, int(st.get("step", 0)), int(st.get("total") or 1))
                code = proc.poll()
                if code is None:
                    continue
                del running[slot]
                free.append(slot)
                outcome = OUTCOME.get(code, "failed")
                if outcome == "failed" and st.get("state") != "failed":
                    # the worker died without recording why (killed, segfault): record it for it
                    reason = f"worker exited with code {code}" + (f" (signal {-code})" if code < 0 else "")
                    job.dir(req.results).update_status(state="failed", error=reason, transient=True)
                outcomes[job.id] = outcome
                if prog:
                    prog.finished(job.id, outcome, outcome_detail(req, job, outcome))
    except KeyboardInterrupt:
        _stop_children([p for p, _ in running.values()])
        raise
    return outcomes


def _stop_children(procs: list[subprocess.Popen], grace_s: float = 15.0) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
