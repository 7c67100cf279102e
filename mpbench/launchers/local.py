"""Serial, in-process execution: the debuggable launcher (breakpoints work).

A stop signal (Ctrl-C, SIGTERM, SIGHUP, SIGUSR1/2; ``mpbench.runner.StopFlag``) makes the running job checkpoint at
its next step; then no further job starts and :class:`mpbench.runner.Stopped` ends the suite (``mpbench run`` exits
128 + the signal's number). A second Ctrl-C aborts at once; the run is then recorded as pending, never running.
"""
from __future__ import annotations

import torch

from mpbench.launchers import Request, device_slots, job_steps, outcome_detail, register_launcher, visible_gpus
from mpbench.plan import Job
from mpbench.runner import Execution, StopFlag, Stopped, checkpoint_step, execute
from mpbench.store import RunDir


def resolve_device(devices) -> torch.device:
    """This process's device: the first of ``launcher.devices`` (its own CUDA numbering), or the CPU."""
    gpu = device_slots(devices or "cpu", 1)[0]
    if gpu is None:
        return torch.device("cpu")
    visible = visible_gpus()
    return torch.device(f"cuda:{visible.index(gpu) if gpu in visible else int(gpu)}")


def resume_from(req: Request, job: Job) -> int | str | None:
    """Where ``job`` will resume: its checkpoint's step ("?" if unreadable), None when it starts afresh."""
    rd = job.dir(req.results)
    if req.force or not rd.checkpoint.exists():
        return None
    step = checkpoint_step(rd)
    return "?" if step is None else step


def stopped_detail(rd: RunDir) -> str:
    """The progress line's detail for an interrupted job: the step its checkpoint holds, or its status note."""
    st = rd.status()
    if st.get("checkpoint_step") is not None and rd.checkpoint.exists():
        return f"checkpointed at step {st['checkpoint_step']}"
    return str(st.get("note") or "")


def stop_summary(req: Request, jobs: list[Job], outcomes: dict[str, str], killed: tuple[str, ...] = ()) -> str:
    """What a stop left behind, for the line ``mpbench run`` prints: the runs checkpointed (and at which step)."""
    saved, lost = [], []
    for job in jobs:
        if outcomes.get(job.id) != "interrupted":
            continue
        st = job.dir(req.results).status()
        if job.id in killed or st.get("checkpoint_step") is None:
            lost.append(job.id)
        else:
            saved.append(f"{job.id} at step {st['checkpoint_step']}")
    parts = []
    if saved:
        parts.append(f"{len(saved)} job{'s' if len(saved) > 1 else ''} checkpointed ({', '.join(saved)})")
    if lost:
        parts.append(f"{len(lost)} stopped before checkpointing ({', '.join(lost)})")
    return "; ".join(parts) or "no job was training"


@register_launcher("local", "serial, in this process (debuggable)",
                   validate=lambda launcher: device_slots(launcher.devices, 1) and None)
def launch_local(req: Request, jobs: list[Job]) -> dict[str, str]:
    args = req.worker_args()
    outcomes: dict[str, str] = {}
    prog = req.progress
    args = {**args, "device": str(resolve_device(req.launcher.devices)), "threads": req.launcher.threads}
    with StopFlag() as stop:                       # shared with each run's own flag: a signal stops the suite
        for job in jobs:
            if stop.flag.is_set():
                break
            ex = Execution.from_args(args)         # a fresh one per job: the runner fills in its hooks
            ex.on_step = (lambda rid, s, t, loss: prog.step(rid, s, t, loss)) if prog else None
            if prog:
                prog.started(job.id, job_steps(job), resume_from(req, job))
            outcome = execute(req.results, job.kind, job.id, ex, force=req.force)
            outcomes[job.id] = outcome
            if prog:
                detail = stopped_detail(job.dir(req.results)) if outcome == "interrupted" else \
                    outcome_detail(req, job, outcome)
                prog.finished(job.id, outcome, detail)
            if outcome == "failed" and req.fail_fast:
                break
        if stop.flag.is_set():
            raise Stopped(stop.signum or 0, stop_summary(req, jobs, outcomes))
    return outcomes
