"""Weights & Biases as an optional sink for curves. Our own JSONL metrics are the source of truth: any W&B
failure is a warning, never a failed run, and no run waits on W&B's network timeout."""
from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

WANDB_HOST = "api.wandb.ai"


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return WANDB_HOST in netrc.read_text()
    except OSError:
        return False


def _reachable(timeout: float = 2.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(mode: str) -> str:
    """auto = online when credentials exist and the server answers, else offline; online falls back the same way."""
    env = os.environ.get("WANDB_MODE")
    if env in ("disabled", "offline"):
        return env
    if mode == "auto":
        mode = "online" if _has_credentials() else "offline"
    if mode == "online" and not _reachable():
        warnings.warn("W&B server unreachable: logging offline instead (sync later with `wandb sync`)")
        return "offline"
    return mode


class WandbSink:
    """One run's W&B run: group = suite, job type = its methods, tags = model and dataset, config = the resolved
    spec; ``train/*`` and ``eval/*`` series against the run's own ``step`` (``define_metric``), so a resumed run
    (the same W&B id) continues its charts; the summary holds the final metrics."""

    def __init__(self, mode: str, project: str, entity: str | None, run_dir: Path, name: str, group: str,
                 config: dict[str, Any], run_id: str | None):
        self.run = None
        self.run_id = run_id
        mode = resolve_mode(mode)
        if mode == "disabled":
            return
        try:
            import wandb

            regs = config.get("regularizer") or []
            self.run = wandb.init(mode=mode, project=project, entity=entity, dir=str(run_dir), name=name, group=group,
                                  job_type="+".join(map(str, regs)) or None, config=config, id=run_id,
                                  tags=[str(config[k]) for k in ("model", "dataset") if config.get(k)],
                                  resume="allow", reinit="create_new",
                                  settings=wandb.Settings(init_timeout=30, silent=True, console="off",
                                                          x_disable_stats=True))
            self.run_id = self.run.id
            self.run.define_metric("step")
            for split in ("train", "eval"):
                self.run.define_metric(f"{split}/*", step_metric="step")
        except Exception as e:  # noqa: BLE001 - a sink must never fail a run
            warnings.warn(f"W&B init failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"continuing without W&B")
            self.run = None

    def log(self, row: dict[str, Any]) -> None:
        """A metrics row as ``{split}/{key}`` numbers at the row's step (no W&B step counter: resumes may repeat)."""
        if self.run is None:
            return
        split = row.get("split", "eval")
        try:
            data = {f"{split}/{k}": v for k, v in row.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "split")}
            self.run.log({"step": int(row.get("step", 0)), **data})
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"W&B log failed ({type(e).__name__}); continuing without W&B")
            self.run = None

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.run is None:
            return
        try:
            if summary:
                self.run.summary.update(summary)
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"W&B finish failed ({type(e).__name__})")
        self.run = None


def log_table(suite: str, table: Any, mode: str, project: str, entity: str | None, run_dir: Path) -> str | None:
    """The suite's report (a pandas frame, long form) as a W&B Table in a summary run of the suite's group;
    returns where it went (a run id), or None when W&B is off or failed (a warning, never an error)."""
    mode = resolve_mode(mode)
    if mode == "disabled":
        return None
    try:
        import wandb

        run = wandb.init(mode=mode, project=project, entity=entity, dir=str(run_dir), name=f"{suite} (report)",
                         group=suite, job_type="report", reinit="create_new",
                         settings=wandb.Settings(init_timeout=30, silent=True, console="off", x_disable_stats=True))
        run.log({"report": wandb.Table(dataframe=table)})
        run.finish()
        return run.id
    except Exception as e:  # noqa: BLE001 - a sink must never fail a command
        warnings.warn(f"W&B report upload failed ({type(e).__name__}); the table is unchanged on disk")
        return None