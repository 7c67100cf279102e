"""Launchers execute waves of independent jobs; the orchestration (stages first, skip done runs, retries,
fail-fast) is shared here. State lives only in run directories, never in a launcher."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from mpbench.errors import UsageError
from mpbench.jobs import JOB_KINDS
from mpbench.plan import Job, Plan
from mpbench.progress import SuiteProgress
from mpbench.registry import Registry


def _load() -> None:
    for mod in ("local", "pool", "slurm"):
        importlib.import_module(f"mpbench.launchers.{mod}")


LAUNCHERS: Registry[Callable[["Request", list[Job]], dict[str, str]]] = Registry("launcher", loader=_load)


def register_launcher(name: str, description: str = "", validate: Callable[[DictConfig], None] | None = None,
                      warm_up: Callable[["Request"], None] | None = None) -> Callable:
    """``validate(launcher_cfg)`` raises UsageError for bad settings before anything is written or submitted;
    ``warm_up(request)`` starts what the launcher needs before the first wave (:func:`warm_up`)."""
    return LAUNCHERS.register(name, description=description, validate=validate, warm_up=warm_up)


def warm_up(req: "Request") -> None:
    """Called once per invocation before :func:`run_plan`, before the progress display starts (the driver runs no
    other thread yet): the launcher's ``warm_up``, e.g. the pool's workers, forked from this process."""
    hook = LAUNCHERS.entry(req.launcher.name).extra.get("warm_up")
    if hook is not None:
        hook(req)


def visible_gpus() -> list[str]:
    """GPU ids without initialising CUDA: CUDA_VISIBLE_DEVICES, else ``nvidia-smi -L``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def device_slots(devices, slots: int) -> list[str | None]:
    """One entry per concurrent worker: a GPU id, or None for CPU."""
    if isinstance(devices, ListConfig):
        devices = list(devices)
    if devices == "cpu":
        return [None] * slots
    if devices == "auto":
        gpus = visible_gpus()
    else:
        gpus = [str(d) for d in (devices if isinstance(devices, list) else [devices])]
        avail = visible_gpus()
        missing = [g for g in gpus if g not in avail]
        if missing:
            raise UsageError(f"launcher.devices names GPU {missing[0]} but visible GPUs are {avail or 'none'}: "
                             f"fix launcher.devices (or use launcher.devices=cpu)")
    return [g for g in gpus for _ in range(slots)] or [None] * slots


def job_steps(job: Job) -> int:
    """Steps of a job, for progress bars."""
    return JOB_KINDS.get(job.kind).steps(job.spec)


def validate_launcher(cfg: DictConfig) -> None:
    check = LAUNCHERS.entry(cfg.launcher.name).extra.get("validate")
    if check is not None:
        check(cfg.launcher)


@dataclass
class Request:
    """One ``mpbench run`` invocation."""

    plan: Plan
    cfg: DictConfig
    results: Path
    data_root: Path
    force: bool = False
    fail_fast: bool = False
    retry_failed: bool = False
    progress: SuiteProgress | None = None
    outcomes: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)       # the invocation's key=value overrides (recorded)
    defined: Plan | None = None                               # the suite without overrides (None: same as plan)

    @property
    def launcher(self) -> DictConfig:
        return self.cfg.launcher

    def worker_args(self) -> dict[str, Any]:
        """What a worker process needs to execute a job (JSON-serialisable)."""
        return {"results": str(self.results), "data_root": str(self.data_root), "suite": self.plan.suite,
                "wandb": OmegaConf.to_container(self.cfg.wandb), "force": self.force,
                "heartbeat_s": self.launcher.heartbeat_s, "stale_after_s": self.launcher.stale_after_s,
                "execution": OmegaConf.to_container(self.cfg.execution) if "execution" in self.cfg else {}}


def write_plan(req: Request) -> None:
    """Create every job's directory and config, and record this invocation in the suite's record."""
    from mpbench.record import record_invocation

    for job in req.plan.jobs:
        job.dir(req.results).create(job.slug, job.spec, job.name)
    defined = req.defined or req.plan
    record_invocation(req.results, req.plan.suite, req.plan.description, req.plan.report,
                      ([j.id for j in defined.runs], [j.id for j in defined.artifacts]),
                      [j.id for j in req.plan.runs], [j.id for j in req.plan.artifacts], req.overrides)


def needs_work(job: Job, req: Request) -> bool:
    rd = job.dir(req.results)
    if req.force:
        return True
    if rd.is_done:
        try:
            json.loads(rd.result_file.read_text())
            return False
        except (OSError, ValueError):
            return True                            # a corrupt result is not a result: train it again
    st = rd.status()
    if st.get("state") == "failed":
        retry = req.retry_failed or (st.get("transient") and int(st.get("attempts", 0)) <= req.launcher.max_retries)
        return bool(retry)
    return True


def waves(req: Request) -> tuple[list[Job], list[Job]]:
    """The first wave: the stages, then every run that needs no stage or only finished ones (so no slot idles
    while a stage trains); the second: the runs that wait for a stage of the first."""
    done = {j.id for j in req.plan.artifacts if j.dir(req.results).is_done and not req.force}
    ready = [j for j in req.plan.runs if set(j.deps) <= done]
    waiting = [j for j in req.plan.runs if not set(j.deps) <= done]
    return [*req.plan.artifacts, *ready], waiting


def run_plan(req: Request) -> dict[str, str]:
    """Two waves (:func:`waves`), each to the configured launcher. Returns outcome per job id."""
    write_plan(req)
    launch = LAUNCHERS.get(req.launcher.name)
    failed_artifacts: set[str] = set()
    first, second = waves(req)
    for wave in (first, second):
        todo = []
        for job in wave:
            bad = [d for d in job.deps if d in failed_artifacts]
            if bad:
                job.dir(req.results).update_status(state="failed", error=f"stage {bad[0]} failed: see its error.txt",
                                                   transient=False)
                req.outcomes[job.id] = "failed"
                if req.progress:
                    req.progress.finished(job.id, "failed", f"stage {bad[0]} failed")
            elif needs_work(job, req):
                todo.append(job)
            else:
                req.outcomes[job.id] = "skipped" if job.dir(req.results).is_done else "failed"
                if req.progress:
                    req.progress.finished(job.id, req.outcomes[job.id], outcome_detail(req, job, "failed"))
        for attempt in range(req.launcher.max_retries + 1):
            if not todo:
                break
            outcomes = launch_grouped(req, launch, todo)
            req.outcomes.update(outcomes)
            if req.fail_fast and "failed" in outcomes.values():
                return req.outcomes
            todo = [j for j in todo if outcomes.get(j.id) == "failed" and j.dir(req.results).status().get("transient")]
            req.force = False
        if wave is first:
            stages = req.plan.artifacts
            wait_for_others([j for j in stages if req.outcomes.get(j.id) == "busy"], req, launch)
            failed_artifacts |= {j.id for j in stages if req.outcomes.get(j.id) == "failed"}
    return req.outcomes


def launch_grouped(req: Request, launch: Callable, todo: list[Job]) -> dict[str, str]:
    """``launch(req, todo)``; with ``execution.seed_array``, each seed group as one array job, its outcome and
    progress told per member run (mpbench/seed_groups.py)."""
    from mpbench import seed_groups

    options = OmegaConf.to_container(req.cfg.execution) if "execution" in req.cfg else {}
    batch, arrays = seed_groups.group(todo, options, req.results)
    if not arrays:
        return launch(req, todo)
    since, progress = time.time(), req.progress
    if progress is not None:
        req.progress = seed_groups.MemberProgress(progress, arrays, req, since)
    try:
        outcomes = launch(req, batch)
    finally:
        req.progress = progress
    return seed_groups.unfold(outcomes, arrays, req.results, since)


def wait_for_others(jobs: list[Job], req: Request, launch: Callable, poll_s: float = 1.0) -> None:
    """Stages claimed by another process: wait until they finish, or take them over when that claim goes stale."""
    from mpbench.claim import is_stale, read_claim

    pending = list(jobs)
    while pending:
        time.sleep(poll_s)
        for job in list(pending):
            rd = job.dir(req.results)
            if rd.is_done or rd.state() == "failed":
                req.outcomes[job.id] = "skipped" if rd.is_done else "failed"
                pending.remove(job)
                continue
            claim = read_claim(rd.lock_file)
            if claim is None or is_stale(claim, req.launcher.stale_after_s):
                req.outcomes.update(launch(req, [job]))
                if req.outcomes[job.id] != "busy":
                    pending.remove(job)


def outcome_detail(req: Request, job: Job, outcome: str) -> str:
    """One line for the progress display: the error of a failed job, accuracy and time of a finished run."""
    from mpbench.store import read_json

    rd = job.dir(req.results)
    if outcome == "failed":
        return rd.status().get("error") or ""
    if outcome == "done" and job.kind == "run":
        try:
            r = read_json(rd.result_file)
            return f"acc {100 * r['final']['acc']:.1f}%  {r['wall_time_s']:.0f}s"
        except (OSError, ValueError, KeyError):
            return ""
    return ""
