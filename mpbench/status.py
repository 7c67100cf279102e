"""`mpbench status`: what each suite's runs are doing, read from run directories only.

Nothing here raises on a broken run directory: a job whose files cannot be read is shown in state ``unreadable``
with what is wrong and how to fix it. A job recorded as ``running`` whose process is gone (dead pid, silent
heartbeat, no claim) is shown as ``interrupted``, never as running. ``--format json`` prints a list with one object
per suite.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mpbench.claim import HOST, holder_gone, read_claim
from mpbench.config import suite_name
from mpbench.errors import UsageError, did_you_mean
from mpbench.results import read_record
from mpbench.store import STATES, RunDir

SUMMARY_ORDER = ("done", "running", "failed", "pending")
DISPLAY_ORDER = ("done", "running", "interrupted", "failed", "pending")
STALE_AFTER_S = 300.0        # launcher.stale_after_s's default, for claims that do not record their own


def _suites(results: Path, suite: str | None, warn: Console) -> list[dict]:
    sdir = results / "suites"
    if suite:
        name = suite_name(suite)
        path = sdir / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in sdir.glob("*.json")) if sdir.is_dir() else []
            hint = did_you_mean(name, known) if known else ""
            hint = f" ({hint})" if hint.startswith("did you mean") else ""
            raise UsageError(f"no results for suite {name!r} in {results}{hint}: "
                             f"run `mpbench run suite={suite}` first or pass --results DIR")
        return [read_record(path, name)]
    if not sdir.is_dir():
        raise UsageError(f"no results in {results}: run `mpbench run suite=NAME` first or pass --results DIR")
    out = []
    for p in sorted(sdir.glob("*.json")):
        try:
            out.append(read_record(p, p.stem))
        except UsageError as e:                    # one broken record does not hide the other suites
            warn.print(f"skipped: {e}", highlight=False, markup=False, soft_wrap=True)
    return out


def _recorded_kind(rd: RunDir) -> str | None:
    """The job kind its own ``config.yaml`` records (None when that file is missing or unreadable)."""
    try:
        kind = yaml.safe_load(rd.config.read_text()).get("kind")
    except Exception:  # noqa: BLE001  (missing, unreadable, not YAML, not a mapping)
        return None
    return kind if isinstance(kind, str) and kind else None


def _detail(state: str, st: dict[str, Any]) -> str:
    if state == "failed":
        return str(st.get("error") or "(no reason recorded)")
    if state == "running":
        try:
            age = f", updated {time.time() - float(st.get('updated', 0)):.0f}s ago"
        except (TypeError, ValueError):
            age = ""
        job = f" slurm job {st['slurm_job_id']}" if st.get("slurm_job_id") else ""
        return f"step {st.get('step', 0)}/{st.get('total', '?')} on {st.get('host', '?')}{job}{age}"
    if state == "pending" and st.get("note"):
        return str(st["note"])
    return ""


def _gone(rd: RunDir, st: dict[str, Any]) -> str | None:
    """Why a job whose ``status.json`` says ``running`` has no live process any more (shown as ``interrupted``),
    or None when it may still be running: its claim's pid is dead on this host, its heartbeat is older than the
    stale limit, or it holds no claim at all (on another host: once its status is older than the stale limit, as
    a lock file just created there may not be visible here yet)."""
    claim = read_claim(rd.lock_file)
    if claim is None:
        st = rd.status()                           # a run writes its last status before it releases its claim
        if st.get("state") != "running" or rd.is_done:
            return None
        claim = read_claim(rd.lock_file)           # ... or another process claimed it in between
    if claim is None:
        try:
            age = time.time() - float(st.get("updated", 0))
        except (TypeError, ValueError):
            age = float("inf")
        if st.get("host") != HOST and age <= STALE_AFTER_S:
            return None
        why = f"process {st.get('pid', '?')} on {st.get('host', '?')} is gone (it holds no claim)"
    else:
        why = holder_gone(claim, STALE_AFTER_S)
        if why is None:
            return None
    then = "rerun to resume from its checkpoint" if rd.checkpoint.exists() else \
        "rerun to restart it (it left no checkpoint)"
    return f"{why}; {then}"


def job_status(results: Path, rid: Any, is_run: bool) -> dict[str, Any]:
    """``{id, kind, state, detail}`` of one job of a suite; never raises on a broken run directory."""
    rid = str(rid)
    try:
        rd = RunDir(results, "run" if is_run else "artifact", rid)   # every non-run kind lives in artifacts/
    except UsageError as e:
        return {"id": rid, "kind": "run" if is_run else None, "state": "unreadable",
                "detail": f"suite record lists {e}: rerun `mpbench run` for this suite"}
    try:
        if not rd.path.exists():
            state, st = "pending", {}
        else:
            st = rd.status()
            state = rd.state()
        if not isinstance(state, str) or not state:
            detail = f"{rd.status_file} records state {state!r}: delete {rd.path} and rerun"
            state = "unreadable"
        else:
            detail = _detail(state, st)
            gone = _gone(rd, st) if state == "running" else None
            if gone:
                state, detail = "interrupted", gone
    except OSError as e:
        state, detail = "unreadable", f"{rd.path}: {e.strerror or e}: fix its permissions or delete it and rerun"
    if state == "done":
        return {"id": rid, "kind": "run" if is_run else None, "state": state, "detail": detail}
    kind = _recorded_kind(rd) or ("run" if is_run else None)
    return {"id": rid, "kind": kind, "state": state, "detail": detail}


def suite_summary(results: Path, record: dict[str, Any]) -> dict[str, Any]:
    """One suite: counts per state and the jobs that are not done (stages first, then runs)."""
    jobs = [job_status(results, a, False) for a in record.get("artifacts", [])] + \
           [job_status(results, r, True) for r in record.get("runs", [])]
    counts = Counter({s: 0 for s in (*SUMMARY_ORDER, *STATES)})
    counts.update(j["state"] for j in jobs)
    return {"suite": str(record["name"]), "jobs": len(jobs), "counts": dict(counts),
            "not_done": [j for j in jobs if j["state"] != "done"]}


def suite_status(results: Path, suite: str | None, console: Console, fmt: str = "table") -> dict[str, Counter]:
    warn = Console(stderr=True)
    summaries = [suite_summary(results, s) for s in _suites(results, suite, warn)]
    if fmt == "json":
        click.echo(json.dumps(summaries, indent=1, default=str))
    else:
        for s in summaries:
            _print_table(s, console)
    return {s["suite"]: Counter({k: v for k, v in s["counts"].items() if v}) for s in summaries}


def _print_table(s: dict[str, Any], console: Console) -> None:
    counts = s["counts"]
    order = [*DISPLAY_ORDER, *sorted(k for k in counts if k not in DISPLAY_ORDER)]
    summary = " · ".join(f"{k} {counts[k]}" for k in order if counts.get(k))
    console.print(f"[bold]{escape(s['suite'])}[/]: {s['jobs']} jobs: {escape(summary) or 'none'}")
    if not s["not_done"]:
        return
    table = Table(title=f"suite {escape(s['suite'])}", show_lines=False)
    for col in ("state", "kind", "id", "detail"):
        table.add_column(col, overflow="fold")
    for j in s["not_done"]:
        table.add_row(escape(j["state"]), escape(j["kind"] or "?"), escape(j["id"]), escape(j["detail"]))
    console.print(table)
