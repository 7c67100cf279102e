"""Execute one job (a run or a stage) in its run directory: claim it, train or resume, record the outcome.

Outcomes: ``done``, ``failed``, ``interrupted`` (checkpoint written; resumes on the next attempt), ``busy``
(another process holds the claim), ``skipped`` (already done).
"""
from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mpbench.claim import Claim, slurm_job_id
from mpbench.errors import MpbenchError, RunFailed, describe_error
from mpbench.jobs import JOB_KINDS, JobKind
from mpbench.malloc import tune_for_training
from mpbench.plan import artifact_path
from mpbench.provenance import device_name, git_info, versions
from mpbench.store import SCHEMA_VERSION, RunDir, atomic_write, save_tensors, write_json
from mpbench.train import Interrupted, RunHooks

def is_transient(e: BaseException) -> bool:
    """Failures worth retrying (launcher.max_retries): I/O, out of memory, CUDA/NCCL hiccups."""
    if isinstance(e, MpbenchError):
        return False
    if isinstance(e, (OSError, torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e) for w in ("CUDA error", "NCCL", "out of memory"))


@dataclass
class Execution:
    """How to execute (not what): device, data location, W&B, progress, claim timing, and the execution options of
    the training step (``options``: the suite's ``execution`` section, mpbench/execution.py)."""

    results: Path
    data_root: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    threads: int = 0
    suite: str = ""
    wandb: dict[str, Any] = field(default_factory=lambda: {"mode": "disabled"})
    heartbeat_s: float = 30.0
    stale_after_s: float = 300.0
    on_step: Callable[[str, int, int, float], None] | None = None
    hooks: RunHooks = field(default_factory=RunHooks)
    artifacts: dict[str, Path] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)   # options refused before the step was built, and why

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "Execution":
        """The Execution a worker builds from its JSON args (``launchers.Request.worker_args`` plus ``device``)."""
        return cls(results=Path(args["results"]), data_root=Path(args["data_root"]),
                   device=torch.device(args.get("device") or "cpu"), threads=int(args.get("threads") or 0),
                   suite=args.get("suite") or "", wandb=dict(args.get("wandb") or {"mode": "disabled"}),
                   heartbeat_s=float(args.get("heartbeat_s", 30.0)),
                   stale_after_s=float(args.get("stale_after_s", 300.0)),
                   options=dict(args.get("execution") or {}))


# Ctrl-C, `kill`/`timeout`/systemd/a cluster's stop, a closed terminal, preemption and Slurm's time-limit warning
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Stopped(KeyboardInterrupt):
    """A launcher stopped its suite on a signal after its runs checkpointed (``what``: which, at which step).

    A KeyboardInterrupt, so every cleanup written for Ctrl-C runs; ``mpbench run`` exits ``128 + signum``."""

    def __init__(self, signum: int, what: str = "") -> None:
        self.signum, self.what = int(signum), what
        self.exit_code = 128 + self.signum
        super().__init__(f"stopped by {signal_name(self.signum)}" + (f": {what}" if what else ""))


class StopFlag:
    """Set by a stop signal (``STOP_SIGNALS``): the training loop checkpoints at its next step and stops.

    ``signum`` is the first signal that arrived. Nested flags (a launcher's around each run's) share the outermost
    one's state, so the launcher sees the signal its run got and stops the suite. A second SIGINT raises
    KeyboardInterrupt at once (abort without waiting for the checkpoint); other repeated signals change nothing.
    SIGINT and SIGHUP stay ignored where they were (``nohup``, a script's background job). Handlers are installed
    only in the main thread (elsewhere the flag is never set by a signal).
    """

    _stack: list["StopFlag"] = []

    def __init__(self) -> None:
        self.flag = threading.Event()
        self._signum: int | None = None
        self._root = self
        self._old: dict[int, Any] = {}

    @property
    def signum(self) -> int | None:
        return self._root._signum

    def _handle(self, signum: int, frame: Any) -> None:
        root = self._root
        if root.flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if root._signum is None:
            root._signum = signum
        root.flag.set()

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            if StopFlag._stack:
                self._root = StopFlag._stack[0]
                self.flag = self._root.flag
            StopFlag._stack.append(self)
            for sig in STOP_SIGNALS:
                if sig in (signal.SIGINT, signal.SIGHUP) and signal.getsignal(sig) == signal.SIG_IGN:
                    continue                       # nohup, a script's background job: asked not to stop on it
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
        if self in StopFlag._stack:
            StopFlag._stack.remove(self)


def checkpoint_step(rd: RunDir) -> int | None:
    """The step ``rd``'s checkpoint resumes from (None: no readable checkpoint); reads no tensor data (mmap)."""
    try:
        return int(torch.load(rd.checkpoint, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # noqa: BLE001 - missing, being replaced, unreadable: the runner reports it when it resumes
        return None


def _load_checkpoint(rd: RunDir) -> dict[str, Any] | None:
    if not rd.checkpoint.exists():
        return None
    try:
        return torch.load(rd.checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RunFailed(f"checkpoint {rd.checkpoint} is unreadable ({type(e).__name__}): delete it to restart "
                        f"this run from step 0") from None


def resolve_artifacts(results: Path, spec: dict[str, Any]) -> dict[str, Path]:
    out = {}
    for kind, ref in spec.get("artifacts", {}).items():
        path = artifact_path(results, kind, ref)
        if not ref.startswith("file:") and not RunDir(results, kind, ref).is_done:
            raise RunFailed(f"{kind} artifact {ref} is not built: rerun `mpbench run` (stages run first)")
        if not path.exists():
            raise RunFailed(f"{kind} artifact {path} is missing: rerun `mpbench run` or fix stages.{kind}.file")
        out[kind] = path
    return out


def execute(results: Path, kind: str, run_id: str, ex: Execution, force: bool = False) -> str:
    rd = RunDir(results, kind, run_id)
    cfg = rd.read_config()
    if rd.is_done and not force:
        return "skipped"
    claim = Claim(rd.lock_file, ex.heartbeat_s, ex.stale_after_s, {"slurm_job_id": slurm_job_id()})
    if not claim.acquire():
        return "busy"
    try:
        if rd.is_done and not force:
            return "skipped"
        if force:
            rd.reset()
        custom = getattr(JOB_KINDS.get(cfg["kind"]), "execute_claimed", None)   # a job of jobs (jobs/array.py)
        return custom(rd, cfg, ex, force) if custom else execute_claimed_job(rd, cfg, ex)
    finally:
        claim.release()


def process_settings(ex: Execution) -> None:
    """Per-process settings of a training job: torch's threads, the allocator."""
    if ex.threads:
        torch.set_num_threads(ex.threads)
    tune_for_training()


def _open_sink(rd: RunDir, cfg: dict[str, Any], kind: type[JobKind], ex: Execution):
    """The job's W&B run (resumed by the id its status records), or None for kinds that do not log."""
    if not kind.wandb:
        return None
    from mpbench.wandb_sink import WandbSink

    w = ex.wandb
    sink = WandbSink(w.get("mode", "disabled"), w.get("project", "mpbench"), w.get("entity"), rd.path,
                     cfg.get("name") or cfg["slug"], ex.suite or "mpbench", cfg["spec"], rd.status().get("wandb_id"))
    if sink.run_id:
        rd.update_status(wandb_id=sink.run_id)
    return sink


def _hooks(rd: RunDir, kind: type[JobKind], spec: dict[str, Any], ex: Execution, state: dict[str, Any] | None,
           sink, stop: StopFlag) -> RunHooks:
    """Progress, metrics rows, W&B, checkpoints and the stop flag of one job, wired to its run directory."""
    history = list(state["history"]) if state else []
    last_status = [0.0]

    def on_step(step: int, total: int, loss: float) -> None:
        if ex.on_step:
            ex.on_step(rd.id, step, total, loss)
        now = time.time()
        if now - last_status[0] > 2.0 or step == total:
            last_status[0] = now
            rd.update_status(step=step, total=total)

    def on_row(row: dict[str, Any]) -> None:
        history.append(row)
        rd.write_metrics(history)
        if sink:
            sink.log(row)

    return RunHooks(on_step=on_step, on_row=on_row, should_stop=stop.flag.is_set,
                    save_checkpoint=lambda s: save_tensors(rd.checkpoint, s), load_checkpoint=lambda: state,
                    checkpoint_every=kind.checkpoint_every(spec), execution=dict(ex.options))


def record_failure(rd: RunDir, e: BaseException) -> None:
    rd.path.mkdir(parents=True, exist_ok=True)
    atomic_write(rd.error_file, traceback.format_exc())
    rd.update_status(state="failed", error=describe_error(e), transient=is_transient(e))


def guarded(rds: list[RunDir], sinks: list[Any], body: Callable[[StopFlag], None]) -> str | None:
    """``body(stop)`` with every outcome but success recorded in each of ``rds`` (the jobs it trains): returns
    ``interrupted`` or ``failed``, None when it finished; a second Ctrl-C propagates. ``sinks`` (filled by
    ``body``) are closed either way."""
    with StopFlag() as stop:
        try:
            body(stop)
            return None
        except Interrupted as e:
            for rd in rds:
                step = checkpoint_step(rd)
                rd.update_status(state="pending", error=None, note=f"interrupted ({e}); resumes from its checkpoint",
                                 checkpoint_step=step, **({"step": step} if step is not None else {}))
            return "interrupted"
        except KeyboardInterrupt:              # a second Ctrl-C: aborted before the checkpoint was written
            for rd in rds:
                rd.mark_unsaved("second Ctrl-C")
            raise
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the suite goes on
            for rd in rds:
                record_failure(rd, e)
            return "failed"
        finally:
            for sink in sinks:
                if sink:
                    sink.finish()


def _execution_record(out: dict[str, Any], cfg: dict[str, Any], ex: Execution) -> dict[str, Any]:
    """The execution options that ran, with each fallback and its reason (kinds without the Stepper: none
    applied; a run that trained alone although ``seed_array`` was asked: why)."""
    from mpbench.execution import unused_record

    if "execution" not in out:
        return unused_record(ex.options, f"a {cfg['kind']} job does not train through the Stepper")
    rec = out["execution"]
    if not isinstance(rec.get("requested"), dict):         # a kind's own record (meta-training's mode)
        return rec
    if rec["requested"].get("seed_array") and "seed_array" not in rec.get("applied", {}):
        from mpbench.seed_array import why_alone

        rec["fallbacks"].setdefault("seed_array", ex.fallbacks.get("seed_array") or why_alone(cfg["spec"]))
    return rec


def _result(rd: RunDir, cfg: dict[str, Any], kind: type[JobKind], out: dict[str, Any], ex: Execution,
            attempts: int, state: dict[str, Any] | None, started: float) -> dict[str, Any]:
    """``result.json``: the outcome with everything needed to trust and reproduce it."""
    spec = cfg["spec"]
    result = {
        "schema": SCHEMA_VERSION, "id": rd.id, "slug": cfg["slug"], "kind": cfg["kind"], "spec": spec,
        "final": out.get("final", {}), "selection": "final", "eval_protocol": out.get("eval_protocol", "deterministic"),
        "seed": spec.get("seed"), "git": git_info(), "versions": versions(), "device": device_name(ex.device),
        "malloc_tuned": tune_for_training(),
        "wall_time_s": time.time() - started, "train_time_s": out.get("train_time_s"),
        "images_per_s": out.get("images_per_s"), "steps": kind.steps(spec),
        "regularizers": out.get("regularizers", {}), "artifacts": spec.get("artifacts", {}),
        "attempts": attempts, "resumed": bool(state), "resumed_from_step": int(state["step"]) if state else None,
        "execution": _execution_record(out, cfg, ex),
    }
    result.update({k: v for k, v in out.items() if k not in result and k != "history"})
    return result


@dataclass
class Member:
    """One job being trained, its run directory wired up (:func:`open_job`)."""

    rd: RunDir
    cfg: dict[str, Any]
    kind: type[JobKind]
    attempts: int
    started: float
    state: dict[str, Any] | None = None
    sink: Any = None
    hooks: RunHooks = field(default_factory=RunHooks)

    @property
    def spec(self) -> dict[str, Any]:
        return self.cfg["spec"]


def start_job(rd: RunDir, cfg: dict[str, Any], ex: Execution) -> Member:
    """A claimed job's per-process settings and status ``running`` (a new attempt)."""
    kind = JOB_KINDS.get(cfg["kind"])
    process_settings(ex)
    attempts = int(rd.status().get("attempts", 0)) + 1
    rd.update_status(state="running", attempts=attempts, host=os.uname().nodename, pid=os.getpid(),
                     started=time.time(), error=None, note=None, slurm_job_id=slurm_job_id(), step=0,
                     total=kind.steps(cfg["spec"]))
    return Member(rd, cfg, kind, attempts, time.time())


def open_job(m: Member, ex: Execution, stop: StopFlag, sinks: list[Any]) -> None:
    """A started job's checkpoint (if any), W&B run (appended to ``sinks``) and hooks."""
    m.state = _load_checkpoint(m.rd)
    m.sink = _open_sink(m.rd, m.cfg, m.kind, ex)
    sinks.append(m.sink)
    m.hooks = _hooks(m.rd, m.kind, m.spec, ex, m.state, m.sink, stop)


def close_sink(m: Member, out: dict[str, Any]) -> None:
    """A trained job's W&B run, closed with its final metrics as the summary."""
    if m.sink:
        m.sink.finish({k: v for k, v in out.get("final", {}).items() if isinstance(v, (int, float))})


def finish_job(m: Member, out: dict[str, Any], ex: Execution) -> str:
    """A trained job's result (and a stage's artifact record), done; its checkpoint removed."""
    if m.kind.is_stage():
        write_json(m.rd.path / "artifact.json", {"kind": m.cfg["kind"], "id": m.rd.id, "spec": m.spec,
                                                 **{k: v for k, v in out.items() if k not in ("history", "final")}})
    m.rd.mark_done(_result(m.rd, m.cfg, m.kind, out, ex, m.attempts, m.state, m.started))
    m.rd.checkpoint.unlink(missing_ok=True)
    return "done"


def execute_claimed_job(rd: RunDir, cfg: dict[str, Any], ex: Execution) -> str:
    m = start_job(rd, cfg, ex)
    sinks: list[Any] = []
    out: dict[str, Any] = {}

    def body(stop: StopFlag) -> None:
        ex.artifacts = resolve_artifacts(ex.results, m.spec)
        open_job(m, ex, stop, sinks)
        ex.hooks = m.hooks
        out.update(m.kind.execute(m.spec, rd, ex))
        close_sink(m, out)

    return guarded([rd], sinks, body) or finish_job(m, out, ex)
