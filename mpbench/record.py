"""A suite's record: which runs belong to it, and every ``mpbench run`` invocation that added some.

``results/suites/<suite>/invocations/<id>.json`` holds one invocation (its overrides, its stage and run ids, when);
each is written once, atomically, so concurrent invocations never overwrite each other. ``results/suites/<suite>.json``
holds the suite as defined (its YAML without overrides: runs, stages, report layout) and the union of everything
recorded, recomputed by each invocation. A record never loses a run: an invocation with overrides adds its runs to
the suite's, it does not replace them.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from mpbench.errors import UsageError, did_you_mean, one_line
from mpbench.store import check_id, write_json


def _dir(results: Path, suite: str) -> Path:
    return Path(results) / "suites" / check_id(suite, "suite name") / "invocations"


def new_invocation_id() -> str:
    """``<UTC time>-<pid>-<random>``: sortable by time, unique across processes and within one."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid()}-{secrets.token_hex(2)}"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("runs", []), list) else None


def invocations(results: Path, suite: str) -> list[dict[str, Any]]:
    """The suite's invocations, oldest first (unreadable files are skipped: they add nothing)."""
    d = _dir(results, suite)
    found = [_read(p) for p in sorted(d.glob("*.json"))] if d.is_dir() else []
    return sorted((f for f in found if f), key=lambda f: (f.get("when", 0), f.get("id", "")))


def _union(*lists: list[str]) -> list[str]:
    return list(dict.fromkeys(i for ids in lists for i in ids))


def record_invocation(results: Path, suite: str, description: str, report: dict[str, Any],
                      defined: tuple[list[str], list[str]], runs: list[str], artifacts: list[str],
                      overrides: list[str], invocation: str | None = None) -> str:
    """Write this invocation, then the suite's record (the suite as defined + every invocation); returns its id."""
    inv = invocation or new_invocation_id()
    d = _dir(results, suite)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / f"{inv}.json", {"id": inv, "when": time.time(), "overrides": list(overrides), "runs": runs,
                                   "artifacts": artifacts})
    path = Path(results) / "suites" / f"{suite}.json"
    legacy = _read(path) if path.exists() and "defined" not in (_read(path) or {}) else None  # before invocations
    every = invocations(results, suite)
    write_json(path, {
        "name": suite, "description": description, "report": report,
        "defined": {"runs": defined[0], "artifacts": defined[1]},
        "runs": _union(defined[0], (legacy or {}).get("runs", []), *(i["runs"] for i in every)),
        "artifacts": _union(defined[1], (legacy or {}).get("artifacts", []), *(i.get("artifacts", []) for i in every)),
        "invocations": [i["id"] for i in every],
    })
    return inv


def select_runs(results: Path, record: dict[str, Any], only_last: bool = False,
                invocation: str | None = None) -> tuple[list[str], str]:
    """(run ids, what they cover) of a suite's record: everything, only the last invocation, or one by id."""
    name = record.get("name", "?")
    if not (only_last or invocation):
        every = invocations(results, name)
        defined = len((record.get("defined") or {}).get("runs", record.get("runs", [])))
        added = len(record.get("runs", [])) - defined
        covers = f"the suite as defined ({defined} runs)"
        if every:
            covers += f" + {len(every)} invocation(s)" + (f" adding {added} run(s)" if added else "")
        return list(record.get("runs", [])), covers
    every = invocations(results, name)
    if not every:
        raise UsageError(f"suite {name} has no recorded invocations: rerun `mpbench run suite={name}`")
    if invocation:
        match = [i for i in every if i["id"] == invocation]
        if not match:
            raise UsageError(f"no invocation {invocation!r} of suite {name}: "
                             f"{did_you_mean(invocation, [i['id'] for i in every])}")
        chosen = match[0]
    else:
        chosen = every[-1]
    over = " ".join(chosen.get("overrides") or []) or "no overrides"
    return list(chosen["runs"]), one_line(f"invocation {chosen['id']} only ({over}; {len(chosen['runs'])} runs)")


def report_selection(results: Path, suite: str | None, only_last: bool = False, invocation: str | None = None
                     ) -> tuple[list[str] | None, dict[str, Any], str | None]:
    """(run ids, the suite's report layout, what they cover) for a report or its figures; every run when no suite."""
    if not suite:
        if only_last or invocation:
            raise UsageError("--only-last and --invocation need suite=NAME")
        return None, {}, None
    from mpbench.results import load_suite

    record = load_suite(results, suite)
    run_ids, covers = select_runs(results, record, only_last, invocation)
    return run_ids, record.get("report") or {}, covers