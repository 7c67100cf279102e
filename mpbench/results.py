"""Read run directories into one pandas frame (one row per run); never raises on a broken run dir."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from mpbench.errors import UsageError, one_line
from mpbench.evals import RUN_METRICS, all_metrics
from mpbench.plan import flatten

try:  # the store module owns the on-disk schema version
    from mpbench.store import SCHEMA_VERSION
except ImportError:  # pragma: no cover - store not written yet
    SCHEMA_VERSION = 1

STATES = ("done", "failed", "running", "pending", "missing")
RUN_STATS = tuple(m.name for m in RUN_METRICS)            # wall_time_s, images_per_s, steps (result.json top level)


def metric_columns() -> list[str]:
    """The declared scalar metrics of every registered evaluation (columns even of an empty frame)."""
    return [n for n, m in all_metrics().items() if m.kind == "scalar" and n not in RUN_STATS]


def base_columns() -> list[str]:
    return ["id", "slug", "regularizer", "model", "dataset", "seed", "state", "error", *metric_columns(),
            "eval_protocol", "git_sha", "git_dirty", *RUN_STATS]
_ID_RE = re.compile(r"^(?P<regs>[^-]+)-(?P<model>.+)-(?P<dataset>[^-]+)-s(?P<seed>\d+)(?:-[0-9a-f]{8})?$")


class Unreadable(Exception):
    """A run-dir file exists but cannot be used (bad JSON/YAML, newer schema)."""


def _read(path: Path, parse: Any, errors: tuple[type[BaseException], ...]) -> dict | None:
    """Parsed mapping, None when absent; raises Unreadable when corrupt."""
    if not path.exists():
        return None
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, *errors) as e:
        raise Unreadable(f"{path.name}: {one_line(e, 200)}") from None
    if not isinstance(data, dict):
        raise Unreadable(f"{path.name}: not a mapping")
    return data


def _read_json(path: Path) -> dict | None:
    """Parsed JSON object, None when absent; raises Unreadable when corrupt or too new."""
    data = _read(path, json.loads, (json.JSONDecodeError,))
    schema = (data or {}).get("schema", 1)
    if not isinstance(schema, int) or schema > SCHEMA_VERSION:
        raise Unreadable(f"{path.name}: schema {schema!r} is newer than this mpbench reads "
                         f"({SCHEMA_VERSION}); upgrade mpbench")
    return data


def _read_config(path: Path) -> dict | None:
    """Parsed config.yaml (safe_load), None when absent; raises Unreadable when corrupt."""
    return _read(path, yaml.safe_load, (yaml.YAMLError,))


def _identity(run_id: str, spec: dict | None) -> dict[str, Any]:
    """slug/regularizer/model/dataset/seed from the spec, or parsed from the run id as a fallback."""
    if spec:
        regs = spec.get("regularizer") or []
        regs = [regs] if isinstance(regs, str) else regs
        return {"regularizer": "+".join(map(str, regs)), "model": spec.get("model"),
                "dataset": spec.get("dataset"), "seed": spec.get("seed")}
    m = _ID_RE.match(run_id)
    if not m:
        return {"regularizer": None, "model": None, "dataset": None, "seed": None}
    return {"regularizer": m["regs"], "model": m["model"], "dataset": m["dataset"], "seed": int(m["seed"])}


def _num(value: Any) -> float:
    """Float, or NaN for None / non-numbers."""
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _error_line(run_dir: Path, status: dict | None) -> str | None:
    """The one-line failure reason: status.json ``error`` or the last line of error.txt."""
    if status and status.get("error"):
        return one_line(status["error"], 200)
    err = run_dir / "error.txt"
    if err.exists():
        lines = [ln for ln in err.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        return one_line(lines[-1], 200) if lines else None
    return None


def _empty_row(run_id: str, spec: dict | None, state: str, error: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in base_columns()}
    row.update({m: math.nan for m in (*metric_columns(), *RUN_STATS)})
    row.update(id=run_id, state=state, error=error, **_identity(run_id, spec))
    row["slug"] = re.sub(r"-[0-9a-f]{8}$", "", run_id)
    if spec:
        for key, value in flatten(spec).items():
            row.setdefault(key, value)
        row["spec_keys"] = list(flatten(spec))
    return row


def read_run(run_dir: Path) -> dict[str, Any]:
    """One frame row for ``run_dir``; raises Unreadable when a file in it is corrupt or too new."""
    config = _read_config(run_dir / "config.yaml") or {}
    status = _read_json(run_dir / "status.json")
    result = _read_json(run_dir / "result.json")
    spec = config.get("spec") or (result or {}).get("spec")
    run_id = config.get("id") or (result or {}).get("id") or run_dir.name
    done = (run_dir / "done").exists() and result is not None
    state = (status or {}).get("state") or "pending"
    error = _error_line(run_dir, status) if not done else None
    if done:
        state = "done"
    elif state not in STATES or state == "done":
        error = f"incomplete run dir (status {state!r}, done marker or result.json missing)"
        state = "pending"
    row = _empty_row(run_id, spec, state, error)
    row["slug"] = config.get("slug") or (result or {}).get("slug") or row["slug"]
    if done:
        final = result.get("final") or {}
        git = result.get("git") or {}
        row.update({k: v if isinstance(v, (list, dict)) else _num(v) for k, v in final.items()})   # every key
        row.update({m: _num(result.get(m)) for m in RUN_STATS})
        row.update(eval_protocol=result.get("eval_protocol"), git_sha=git.get("sha"), git_dirty=git.get("dirty"))
    return row


def load_runs(results_dir: Path, run_ids: list[str] | None = None
              ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Frame of all runs under ``results_dir/runs`` (or just ``run_ids``, in that order) + skipped dirs.

    A dir that cannot be read is listed in the second value as ``(dir name, reason)`` and still gets a
    row with state ``missing`` (so the report counts it as an absent seed). Listed ids without a dir
    are ``missing`` too.
    """
    runs_dir = Path(results_dir) / "runs"
    if run_ids is None:
        dirs = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
        names = [p.name for p in dirs]
    else:
        names = list(dict.fromkeys(run_ids))
    rows, skipped = [], []
    for name in names:
        run_dir = runs_dir / name
        if not run_dir.is_dir():
            rows.append(_empty_row(name, None, "missing", "no run directory"))
            continue
        try:
            rows.append(read_run(run_dir))
        except Unreadable as e:
            skipped.append((name, str(e)))
            try:
                spec = (_read_config(run_dir / "config.yaml") or {}).get("spec")
            except Unreadable:
                spec = None
            rows.append(_empty_row(name, spec, "missing", f"unreadable: {e}"))
    base = base_columns()
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=base)
    extra = sorted(c for c in df.columns if c not in base)
    df = df[base + extra]
    df["seed"] = df["seed"].astype("Int64")
    for col in (*metric_columns(), *RUN_STATS):
        df[col] = df[col].astype("float64")
    keys = df.pop("spec_keys") if "spec_keys" in df.columns else pd.Series(dtype=object)
    df = df.reset_index(drop=True)
    df["has_spec"] = keys.notna().to_numpy() if len(keys) == len(df) else False
    df.attrs["spec_keys"] = list(dict.fromkeys(k for ks in keys.dropna() for k in ks))   # columns from the specs
    return df, skipped


def read_record(path: Path, name: str) -> dict:
    """A suite record file, checked (``runs`` and ``artifacts`` lists); a one-line usage error when unusable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"suite record {path} is unreadable ({one_line(e, 200)}): rerun `mpbench run suite={name}` "
                         f"to rewrite it") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k, []), list) for k in ("runs", "artifacts")):
        raise UsageError(f"suite record {path} is malformed: rerun `mpbench run suite={name}` to rewrite it")
    data.setdefault("name", name)
    return data


def load_suite(results_dir: Path, name: str) -> dict:
    """The suite record ``results/suites/<name>.json`` written by ``mpbench run``."""
    path = Path(results_dir) / "suites" / f"{name}.json"
    if not path.exists():
        raise UsageError(f"no results for suite {name}: run `mpbench run suite={name}` first")
    return read_record(path, name)
