"""Serial, in-process execution: the debuggable launcher (breakpoints work)."""
from __future__ import annotations

import torch

from mpbench.launchers import Request, outcome_detail, register_launcher
from mpbench.plan import Job
from mpbench.runner import Execution, execute


def resolve_device(devices) -> torch.device:
    if devices in ("cpu", None):
        return torch.device("cpu")
    if devices == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ids = list(devices) if not isinstance(devices, int) else [devices]
    return torch.device(f"cuda:{ids[0]}")


@register_launcher("local", "serial, in this process (debuggable)")
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
            prog.started(job.id, job.spec.get("train", {}).get("steps") or job.spec.get("steps"))
        outcome = execute(req.results, job.kind, job.id, ex, force=req.force)
        outcomes[job.id] = outcome
        if prog:
            prog.finished(job.id, outcome, outcome_detail(req, job, outcome))
        if outcome == "failed" and req.fail_fast:
            break
    return outcomes
