"""`mpbench status`: what each suite's runs are doing, read from run directories only."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mpbench.errors import UsageError
from mpbench.store import RunDir, read_json


def _suites(results: Path, suite: str | None) -> list[dict]:
    sdir = results / "suites"
    if suite:
        path = sdir / f"{Path(suite).stem}.json"
        if not path.exists():
            raise UsageError(f"no results for suite {suite!r} in {results}: run `mpbench run suite={suite}` first")
        return [read_json(path)]
    if not sdir.is_dir():
        raise UsageError(f"no results in {results}: run `mpbench run suite=NAME` first or pass --results DIR")
    return [read_json(p) for p in sorted(sdir.glob("*.json"))]


def suite_status(results: Path, suite: str | None, console: Console) -> dict[str, Counter]:
    totals = {}
    for s in _suites(results, suite):
        jobs = [("artifact", a) for a in s.get("artifacts", [])] + [("run", r) for r in s.get("runs", [])]
        counts: Counter = Counter()
        table = Table(title=f"suite {s['name']}", show_lines=False)
        for col in ("state", "run", "detail"):
            table.add_column(col, overflow="fold")
        for where, rid in jobs:
            kind = "run" if where == "run" else rid.split("-", 1)[0]
            rd = RunDir(results, kind, rid)
            state = rd.state() if rd.path.exists() else "pending"
            counts[state] += 1
            st = rd.status()
            if state == "failed":
                detail = st.get("error") or "(no reason recorded)"
            elif state == "running":
                age = time.time() - float(st.get("updated", 0))
                job = f" slurm job {st['slurm_job_id']}" if st.get("slurm_job_id") else ""
                detail = f"step {st.get('step', 0)}/{st.get('total', '?')} on {st.get('host', '?')}{job}, " \
                         f"updated {age:.0f}s ago"
            elif state == "pending" and st.get("note"):
                detail = st["note"]
            else:
                detail = ""
            if state != "done":
                table.add_row(state, rid, detail)
        summary = " · ".join(f"{k} {counts[k]}" for k in ("done", "running", "failed", "pending") if counts[k])
        console.print(f"[bold]{s['name']}[/]: {len(jobs)} jobs: {summary or 'none'}")
        if table.row_count:
            console.print(table)
        totals[s["name"]] = counts
    return totals
