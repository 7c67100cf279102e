"""A seed array job (``execution.seed_array``, made by mpbench/seed_groups.py): member runs that differ only by
seed, trained as one vmapped model (mpbench/seed_array.py, mpbench/array_loop.py).

Each member stays its own run, as if it had trained alone: claimed, status, W&B run, checkpoint, metrics.jsonl
and result.json in its own directory (through the runner's per-job pieces). The array's own directory holds its
config, lock, stdout.log and status (with each member's outcome, ``members``); it is never ``done``.

Members trained alone instead, through the runner's single-run path, with the reason in their result
(``execution.fallbacks.seed_array``): when only one needs training (the others done or claimed elsewhere), when
their checkpoints are at different steps (each resumes from its own), or when the array cannot be built (e.g. a
model that draws dropout masks). A non-finite loss fails the seeds it occurred in; the others then train alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

from mpbench.jobs import JobKind, register_job_kind

ALONE = ("compile_mode", "seed_array", "seed_array_max")     # options that are no step option of their own


@register_job_kind("array", "a seed array: the grid's runs that differ only by seed, trained as one vmapped "
                            "model, each still its own run (execution.seed_array=true)")
class SeedArrayJob(JobKind):

    @classmethod
    def slug(cls, spec: dict[str, Any]) -> str:
        return f"array-{'+'.join(spec['regularizer'])}-{spec['model']}-{spec['dataset']}-x{len(spec['members'])}"

    @classmethod
    def execute(cls, spec: dict[str, Any], rd: Any, ex: Any) -> dict[str, Any]:
        raise NotImplementedError("an array job runs through execute_claimed (it trains its member runs)")

    @classmethod
    def execute_claimed(cls, rd: Any, cfg: dict[str, Any], ex: Any, force: bool = False) -> str:
        """Claim the members, train them (as an array where possible), record each one's outcome."""
        from mpbench.claim import Claim, slurm_job_id
        from mpbench.store import RunDir

        rd.update_status(state="running", members={}, error=None, pid=os.getpid(), host=os.uname().nodename,
                         started=time.time(), step=0, total=cls.steps(cfg["spec"]))
        told: dict[str, str] = {}
        with contextlib.ExitStack() as claims:
            mine = []
            for mid in cfg["spec"]["members"]:
                m = RunDir(ex.results, "run", mid)
                claim = Claim(m.lock_file, ex.heartbeat_s, ex.stale_after_s, {"slurm_job_id": slurm_job_id()})
                if m.is_done and not force:
                    told[mid] = "skipped"
                elif not claim.acquire():
                    told[mid] = "busy"
                else:
                    claims.callback(claim.release)
                    if m.is_done and not force:
                        told[mid] = "skipped"
                        continue
                    if force:
                        m.reset()
                    mine.append(m)
            try:
                told.update(_train(rd, mine, ex))
            except BaseException:                  # a second Ctrl-C: never left running
                rd.update_status(state="pending", members=told)
                raise
        return _summary(rd, told)


def _summary(rd: Any, told: dict[str, str]) -> str:
    """The array's outcome (what its launcher acts on) from its members', all recorded in its status."""
    from mpbench.store import RunDir

    got = set(told.values())
    outcome = next((o for o in ("interrupted", "failed", "done", "busy") if o in got), "skipped")
    steps = [RunDir(rd.path.parent.parent, "run", m).status().get("checkpoint_step") for m, o in told.items()
             if o == "interrupted"]
    rd.update_status(state={"done": "done", "skipped": "done", "failed": "failed"}.get(outcome, "pending"),
                     members=told, checkpoint_step=min((s for s in steps if s is not None), default=None))
    return outcome


def _alone(mine: list[Any], ex: Any, why: str) -> dict[str, str]:
    """Each member through the runner's single-run path (claimed already), ``why`` recorded in its result."""
    from mpbench.runner import execute_claimed_job
    from mpbench.train import RunHooks

    told = {}
    for m in mine:
        told[m.id] = execute_claimed_job(m, m.read_config(), dataclasses.replace(
            ex, hooks=RunHooks(), artifacts={}, fallbacks={"seed_array": why}))
        if told[m.id] == "interrupted":
            break                                  # stopped: the rest stays pending, as a launcher leaves it
    return told


def _why_alone(mine: list[Any]) -> str | None:
    from mpbench.runner import checkpoint_step

    if len(mine) < 2:
        return "only one of its seeds needed training (the others were done or claimed by another process)"
    steps = [(checkpoint_step(m) if m.checkpoint.exists() else None) for m in mine]
    if any(m.checkpoint.exists() and s is None for m, s in zip(mine, steps)) or len(set(steps)) > 1:
        return (f"its seeds' checkpoints are at different steps ({', '.join(str(s) for s in steps)}; none: "
                f"no checkpoint): each resumed alone")
    return None


def _train(rd: Any, mine: list[Any], ex: Any) -> dict[str, str]:
    from mpbench.errors import describe_error
    from mpbench.runner import resolve_artifacts, process_settings
    from mpbench.seed_array import SeedArray
    from mpbench.train import build

    if not mine:
        return {}
    why = _why_alone(mine)
    if why:
        return _alone(mine, ex, why)
    specs = [m.read_config()["spec"] for m in mine]
    try:
        process_settings(ex)
        ex.artifacts = resolve_artifacts(ex.results, specs[0])
        setups = [build(spec, ex.data_root, ex.device, ex.artifacts) for spec in specs]
        for s in setups:
            s.model.train()
        arr = SeedArray(setups, specs, ex.device)
    except Exception as e:  # noqa: BLE001 - refused (or failed to build): each member alone records its own
        return _alone(mine, ex, f"the seed array was not built ({describe_error(e)}): each seed trained alone")
    return _train_array(rd, mine, arr, ex)


def _record(ex: Any, size: int) -> dict[str, Any]:
    """``execution`` of a member: the seed array applied, every step option off (the array's step is eager)."""
    from mpbench.execution import DEFAULTS, resolve

    req = resolve(ex.options)
    off = {k: "a seed array's step runs eagerly (mpbench/seed_array.py)" for k, v in req.items()
           if v != DEFAULTS[k] and k not in ALONE}
    return {"requested": req, "applied": {"seed_array": size}, "fallbacks": off,
            "notes": {"seed_array": f"trained in one vmapped model with {size - 1} other seed(s); train_time_s "
                                    f"is the array's"}}


def _train_array(rd: Any, mine: list[Any], arr: Any, ex: Any) -> dict[str, str]:
    from mpbench.array_loop import MemberLoop, train_array
    from mpbench.runner import close_sink, finish_job, guarded, open_job, start_job

    jobs = [start_job(m, m.read_config(), ex) for m in mine]
    sinks: list[Any] = []
    outs: list[dict[str, Any]] = []
    failed: list[Any] = []
    info = {"size": len(jobs), "array": rd.id, "members": [j.rd.id for j in jobs]}
    status = _array_status(rd)

    def body(stop: Any) -> None:
        for j in jobs:
            open_job(j, ex, stop, sinks)
        loops = [MemberLoop(s, j.spec, j.hooks) for s, j in zip(arr.setups, jobs)]
        try:
            got = train_array(arr, loops, ex.device, status)
        except Exception as e:
            failed.extend(_nan_seeds(e, jobs))     # the seeds it occurred in; others retrain alone below
            if not failed:
                raise
            return
        for j, s, out in zip(jobs, arr.setups, got):
            out.update(regularizers=s.stack.describe(), eval_protocol=s.stack.eval_protocol.describe(),
                       transferred_params=s.stack.transferred(), execution=_record(ex, len(jobs)), seed_array=info)
            close_sink(j, out)
            outs.append(out)

    outcome = guarded([j.rd for j in jobs], sinks, body)
    if outcome:
        return {j.rd.id: outcome for j in jobs}
    if failed:
        rest = [j.rd for j in jobs if j not in failed]
        return {**{j.rd.id: "failed" for j in failed},
                **_alone(rest, ex, f"the seed array stopped: {failed[0].rd.status().get('error')}")}
    return {j.rd.id: finish_job(j, out, ex) for j, out in zip(jobs, outs)}


def _nan_seeds(e: Exception, jobs: list[Any]) -> list[Any]:
    """The members a non-finite loss occurred in (their failure recorded), or [] for any other error."""
    from mpbench.runner import record_failure

    seeds = getattr(e, "seeds", None)
    bad = [j for j in jobs if seeds and j.spec["seed"] in seeds]
    for j in bad:
        record_failure(j.rd, e)
    return bad


def _array_status(rd: Any):
    """The array's own progress (``step`` in its status, as a pool launcher reads it), every 2 s at most."""
    last = [0.0]

    def on_step(step: int, total: int) -> None:
        now = time.time()
        if now - last[0] > 2.0 or step == total:
            last[0] = now
            rd.update_status(step=step, total=total)

    return on_step
