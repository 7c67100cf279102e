"""Preflight: the whole plan checked before the first job starts.

The planner (``plan.expand``) already refuses unknown names, bad values, incompatible method/architecture pairs
and stage files that are not their kind's payload. Here the rest: every dataset's files in place (each problem
says how to get them), the launcher's settings, and a writable results directory. Every problem is reported at
once, one line each (``PreflightError``, exit code 2), and nothing is written.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from mpbench.data import DATASETS, SPLITS
from mpbench.errors import MpbenchError, PreflightError, UsageError
from mpbench.jobs import JOB_KINDS
from mpbench.plan import Plan, expand


def dataset_problems(plan: Plan, data_root: Path) -> list[str]:
    """One line per dataset (of runs and stages alike) whose files are missing or unreadable."""
    names = dict.fromkeys(d for job in plan.jobs for d in JOB_KINDS.get(job.kind).datasets(job.spec))
    problems = []
    for name in names:
        source = DATASETS.get(name)()
        try:
            for split in SPLITS:
                source.require(data_root, split)
        except MpbenchError as e:
            problems.append(str(e))
    return problems


def results_problem(results: Path) -> str | None:
    """Why ``results`` cannot hold run directories, or None."""
    if results.exists() and not results.is_dir():
        return f"results dir {results} is a file: pass --results DIR with a directory"
    probe = results
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"results dir {results} is not writable ({probe} is read-only): pass a writable --results DIR"
    return None


def preflight(cfg: DictConfig, results: Path, data_root: Path) -> Plan:
    """The plan of ``cfg``, or ``PreflightError`` listing everything that would make a job fail for a reason
    known now (the planner's problems first)."""
    from mpbench.launchers import validate_launcher

    problems: list[str] = []
    plan = expand(cfg, data_root, problems)
    problems += dataset_problems(plan, data_root)
    try:
        validate_launcher(cfg)
    except UsageError as e:
        problems.append(str(e))
    bad_results = results_problem(Path(results))
    if bad_results:
        problems.append(bad_results)
    if problems:
        raise PreflightError(list(dict.fromkeys(problems)))
    return plan
