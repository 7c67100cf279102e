"""Seed groups (``execution.seed_array``): the runs of one wave that differ only by seed become array jobs
(mpbench/jobs/array.py), trained as one vmapped model; outcomes and progress are told per member run again.

A launcher sees an array as one job (dispatched by kind and id like any); :func:`group` makes them before a
launch, :func:`unfold` maps the array's outcome back to its member runs after it, and :class:`MemberProgress`
shows the members, not the array, in the progress display.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

from mpbench.plan import Job
from mpbench.store import RunDir


def _key(job: Job) -> str:
    return json.dumps({k: v for k, v in job.spec.items() if k != "seed"}, sort_keys=True, default=str)


def _chunks(jobs: list[Job], most: int) -> list[list[Job]]:
    """``jobs`` in near-equal chunks of at most ``most``."""
    n = math.ceil(len(jobs) / most)
    size, extra = divmod(len(jobs), n)
    out, i = [], 0
    for c in range(n):
        out.append(jobs[i:i + size + (c < extra)])
        i += size + (c < extra)
    return out


def array_job(members: list[Job]) -> Job:
    """The array job of ``members`` (runs equal but for their seeds): its id names exactly these runs."""
    from mpbench.jobs import JOB_KINDS

    spec = {k: v for k, v in members[0].spec.items() if k != "seed"}
    spec.update(seeds=[j.spec["seed"] for j in members], members=[j.id for j in members])
    slug = JOB_KINDS.get("array").slug(spec)
    digest = hashlib.sha256(json.dumps(spec["members"]).encode()).hexdigest()[:8]
    return Job(f"{slug}-{digest}", slug, "array", spec, deps=list(members[0].deps), name=slug)


def group(jobs: list[Job], options: dict[str, Any], results: Any) -> tuple[list[Job], dict[str, list[Job]]]:
    """``jobs`` with each group of >= 2 runs that differ only by seed (and whose method a seed array supports)
    replaced by one array job at its first member's place (its directory created); and array id -> members."""
    from mpbench.execution import resolve
    from mpbench.seed_array import seed_only, supports

    opts = resolve(options)
    if not opts["seed_array"]:
        return list(jobs), {}
    buckets: dict[str, list[Job]] = {}
    for job in jobs:
        if job.kind == "run" and supports(job.spec["regularizer"]) is None:
            buckets.setdefault(_key(job), []).append(job)
    arrays: dict[str, list[Job]] = {}
    first: dict[str, Job] = {}
    for runs in buckets.values():
        for chunk in _chunks(runs, int(opts["seed_array_max"])):
            if len(chunk) >= 2 and seed_only([j.spec for j in chunk]) is None:
                arr = array_job(chunk)
                arr.dir(results).create(arr.slug, arr.spec, arr.name)
                arrays[arr.id] = chunk
                first[chunk[0].id] = arr
    grouped = {j.id for runs in arrays.values() for j in runs}
    return [first.get(j.id, j) for j in jobs if j.id not in grouped or j.id in first], arrays


def unfold(outcomes: dict[str, str], arrays: dict[str, list[Job]], results: Any, since: float) -> dict[str, str]:
    """``outcomes`` of a launch with each array's replaced by its members' (read from the array's status, which
    the array writes per member, else from each member's directory); an array the launcher did not start
    (stopped, fail-fast) leaves its members without one, as any job it did not start."""
    out = {k: v for k, v in outcomes.items() if k not in arrays}
    for aid, members in arrays.items():
        for job in members if aid in outcomes else []:
            out[job.id] = outcome_of(job, aid, outcomes[aid], results, since)
    return out


def outcome_of(job: Job, array_id: str, array_outcome: str, results: Any, since: float) -> str:
    """One member's outcome: as its array recorded it in this launch (after ``since``), else from its directory
    (a member an array left ``running`` when it died is failed, with the array's reason)."""
    ast = RunDir(results, "array", array_id).status()
    told = ast.get("members") if float(ast.get("updated", 0)) >= since else None
    if isinstance(told, dict) and job.id in told:
        return str(told[job.id])
    rd = job.dir(results)
    if rd.is_done:
        return "done"
    st = rd.status()
    if array_outcome == "interrupted" and st.get("state") == "running":     # its array died while stopping
        rd.mark_unsaved(f"its seed array {array_id} stopped")
    if st.get("state") == "failed" or array_outcome == "failed":
        if st.get("state") != "failed":
            rd.update_status(state="failed", error=ast.get("error") or f"its seed array {array_id} failed",
                             transient=bool(ast.get("transient", True)))
        return "failed"
    return array_outcome


class MemberProgress:
    """A launcher's progress display, told per member run where the launcher speaks of an array."""

    def __init__(self, inner: Any, arrays: dict[str, list[Job]], req: Any, since: float | None = None):
        self.inner, self.arrays, self.req = inner, arrays, req
        self.since = time.time() if since is None else since
        self.outcomes: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def started(self, run_id: str, total_steps: int | None, resume_from: int | str | None = None) -> None:
        from mpbench.launchers.local import resume_from as member_resumes_from

        for job in self.arrays.get(run_id, []):
            self.inner.started(job.id, total_steps, member_resumes_from(self.req, job))
        if run_id not in self.arrays:
            self.inner.started(run_id, total_steps, resume_from)

    def step(self, run_id: str, step: int, total: int, loss: float | None = None) -> None:
        for job in self.arrays.get(run_id, []):
            self.inner.step(job.id, step, total, loss)
        if run_id not in self.arrays:
            self.inner.step(run_id, step, total, loss)

    def finished(self, run_id: str, outcome: str, detail: str = "") -> None:
        from mpbench.launchers import outcome_detail
        from mpbench.launchers.local import stopped_detail

        if run_id not in self.arrays:
            self.inner.finished(run_id, outcome, detail)
            return
        for job in self.arrays[run_id]:
            got = outcome_of(job, run_id, outcome, self.req.results, self.since)
            rd = job.dir(self.req.results)
            self.inner.finished(job.id, got, stopped_detail(rd) if got == "interrupted" else
                                outcome_detail(self.req, job, got))
