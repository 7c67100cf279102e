"""Serial, in-process execution: the debuggable launcher (breakpoints work)."""
from __future__ import annotations

import torch

from mpbench.launchers import Request, device_slots, job_steps, outcome_detail, register_launcher, visible_gpus
from mpbench.plan import Job
from mpbench.runner import Execution, execute


def resolve_device(devices) -> torch.device:
    """This process's device: the first of ``launcher.devices`` (its own CUDA numbering), or the CPU."""
    gpu = device_slots(devices or "cpu", 1)[0]
    if gpu is None:
        return torch.device("cpu")
    visible = visible_gpus()
    return torch.device(f"cuda:{visible.index(gpu) if gpu in visible else int(gpu)}")


@register_launcher("local", "serial, in this process (debuggable)",
                   validate=lambda launcher: device_slots(launcher.devices, 1) and None)
def launch_local(req: Request, jobs: list[Job]) -> dict[str, str]:
    args = req.worker_args()
    outcomes = {}
    prog = req.progress
    for job in jobs:
        ex = Execution(results=req.results, data_root=req.data_root, device=resolve_device(req.launcher.devices),
                       threads=req.launcher.threads, suite=args["suite"], wandb=args["wandb"],
                       heartbeat_s=args["heartbeat_s"], stale_after_s=args["stale_after_s"],
                       on_step=(lambda rid, s, t, loss: prog.step(rid, s, t, loss)) if prog else None)
        if prog:
            prog.started(job.id, job_steps(job))
        outcome = execute(req.results, job.kind, job.id, ex, force=req.force)
        outcomes[job.id] = outcome
        if prog:
            prog.finished(job.id, outcome, outcome_detail(req, job, outcome))
        if outcome == "failed" and req.fail_fast:
            break
    return outcomes
