"""The result store: run directories, atomic file writes, status records. No pickle anywhere."""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from mpbench.errors import UsageError

SCHEMA_VERSION = 1
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
STATES = ("pending", "running", "done", "failed")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to memory, then :func:`atomic_write`: a reader never sees a half-written checkpoint."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def check_id(run_id: str, what: str = "run id") -> str:
    """Run ids and suite names name files: they may not escape the results dir."""
    if not _SAFE_ID.match(run_id) or ".." in run_id:
        raise UsageError(f"invalid {what} {run_id!r}: use letters, digits and _.+=- only")
    return run_id


def prepare_results_dir(root: Path) -> Path:
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"results dir {root} is a file: pass --results DIR with a directory")
    try:
        for sub in ("runs", "artifacts", "suites"):
            (root / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create results dir {root}: {e.strerror}: pass a writable --results DIR") from None
    if not os.access(root / "runs", os.W_OK):
        raise UsageError(f"results dir {root} is read-only: pass a writable --results DIR")
    return root


class RunDir:
    """One run's (or artifact's) directory and its files."""

    def __init__(self, results: Path, kind: str, run_id: str):
        self.id = check_id(run_id)
        self.kind = kind
        self.path = Path(results) / ("runs" if kind == "run" else "artifacts") / run_id

    config = property(lambda self: self.path / "config.yaml")
    status_file = property(lambda self: self.path / "status.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    result_file = property(lambda self: self.path / "result.json")
    error_file = property(lambda self: self.path / "error.txt")
    done_file = property(lambda self: self.path / "done")
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    lock_file = property(lambda self: self.path / "lock")

    def create(self, slug: str, spec: dict[str, Any], name: str | None = None) -> None:
        """Write ``config.yaml`` (id, slug, display ``name``, kind, spec) unless it exists."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.config.exists():
            self.read_config()                         # refuses dirs of a newer schema before anything runs
        else:
            atomic_write(self.config, yaml.safe_dump({"id": self.id, "slug": slug, "name": name or slug,
                                                      "kind": self.kind, "schema": SCHEMA_VERSION, "spec": spec},
                                                     sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        try:
            cfg = yaml.safe_load(self.config.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise UsageError(f"{self.config}: unreadable ({e.__class__.__name__}): delete {self.path} and rerun") from None
        if not isinstance(cfg, dict) or "spec" not in cfg:
            raise UsageError(f"{self.config}: not an mpbench run config: delete {self.path} and rerun")
        if cfg.get("schema", 1) > SCHEMA_VERSION:
            raise UsageError(f"{self.path} was written by a newer mpbench (schema {cfg['schema']}): upgrade mpbench")
        return cfg

    @property
    def is_done(self) -> bool:
        return self.done_file.exists() and self.result_file.exists()

    def status(self) -> dict[str, Any]:
        try:
            st = read_json(self.status_file)
            return st if isinstance(st, dict) else {"state": "pending"}
        except (OSError, ValueError):
            return {"state": "done" if self.is_done else "pending"}

    def state(self) -> str:
        if self.is_done:
            return "done"
        return self.status().get("state", "pending")

    def update_status(self, **fields: Any) -> dict[str, Any]:
        st = self.status()
        st.update(fields, schema=SCHEMA_VERSION, updated=time.time())
        write_json(self.status_file, st)
        return st

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        atomic_write(self.metrics_file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def mark_unsaved(self, how: str) -> None:
        """Stopped before its checkpoint was written (``how``: by what): pending again, never left running."""
        then = "resumes from its last checkpoint" if self.checkpoint.exists() else "restarts from step 0"
        self.update_status(state="pending", error=None, checkpoint_step=None,
                           note=f"interrupted before its checkpoint ({how}); {then}")

    def mark_done(self, result: dict[str, Any]) -> None:
        write_json(self.result_file, result)
        atomic_write(self.done_file, "")
        self.update_status(state="done", error=None)

    def reset(self) -> None:
        """Forget a previous attempt (for --force): results are replaced only when the new run finishes."""
        for f in (self.done_file, self.checkpoint, self.error_file):
            f.unlink(missing_ok=True)
