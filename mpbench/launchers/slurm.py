"""Slurm launcher: every wave (stages, then runs) is ONE submitit job array, one element per
``launcher.jobs_per_task`` run directories (default 1).

Each element calls :class:`RunJob` (a ``submitit.helpers.Checkpointable``), which executes its run directories in
sequence in one process (torch and timm imported once; each job isolated as in a pool worker:
``mpbench.worker.run_isolated``); the launcher polls ``sacct`` (through submitit) and the run directories' status
files for progress, and maps each job to an outcome (done / failed / interrupted / busy). ``launcher.time_min`` is
per element: with several jobs per element it must cover them, else the element times out, checkpoints and is
requeued with the jobs it has not finished (below).

Preemption, time limits and requeue
-----------------------------------
submitit submits with ``--signal=USR2@90`` and, in the job, installs a USR2 handler that calls ``checkpoint``,
requeues the job (``scontrol requeue``) and exits; it ignores SIGTERM. While a run trains, the runner's own
handlers (``mpbench.runner.StopFlag``: TERM/USR1/USR2) replace submitit's, so the signal only sets a stop flag:
the training loop writes ``checkpoint.pt`` at the next step and ``execute`` returns ``interrupted``, restoring
submitit's handlers. ``RunJob`` notes which signals arrived (``signal.set_wakeup_fd``) and then:

* USR2 (Slurm's warning before the time limit, or preemption with ``SlurmctldParameters=preempt_send_user_signal``,
  or ``scancel --signal=USR2``): it re-raises USR2 into submitit's handler, which pickles
  ``RunJob.checkpoint(args)`` (the same run directory), requeues the element and exits; Slurm restarts it
  (after ``cred_expire``) and ``execute`` resumes from ``checkpoint.pt`` (``result.json``: ``resumed``, ``attempts``).
* SIGTERM only (``scancel``, Ctrl-C of this launcher, preemption on clusters that send no user signal): it returns
  ``interrupted`` with the checkpoint written. If Slurm requeues the job itself (``PreemptMode=REQUEUE``), the
  launcher keeps waiting, because an ``interrupted`` element counts as finished only in a terminal Slurm state.

Ctrl-C in the launcher cancels its array (``scancel``): running elements checkpoint; the next ``mpbench run``
resumes them. A timed-out element is requeued at most 3 times (submitit's ``max_num_timeout``); preemptions are
not counted, except with ``launcher.time_min <= 10``, where submitit counts every USR2 as a time-out.
"""
from __future__ import annotations

import contextlib
import difflib
import io
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import submitit
from omegaconf import DictConfig, OmegaConf
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import DelayedSubmission, FailedJobError, FailedSubmissionError
from submitit.slurm.slurm import SlurmJob, SlurmJobEnvironment, _get_default_parameters

from mpbench.errors import UsageError
from mpbench.launchers import Request, outcome_detail, register_launcher
from mpbench.plan import Job
from mpbench.store import RunDir

# long options of sbatch 22.05 (`sbatch --help`), as launcher.sbatch keys (dashes or underscores)
SBATCH_OPTIONS = frozenset("""
account acctg_freq array batch bb bbf begin chdir cluster_constraint clusters comment constraint container
contiguous core_spec cores_per_socket cpu_freq cpus_per_gpu cpus_per_task deadline delay_boot dependency
distribution error exclude exclusive export export_file extra_node_info get_user_env gid gpu_bind gpu_freq gpus
gpus_per_node gpus_per_socket gpus_per_task gres gres_flags hint hold ignore_pbs input job_name kill_on_invalid_dep
licenses mail_type mail_user mcs_label mem mem_bind mem_per_cpu mem_per_gpu mincpus network nice no_kill no_requeue
nodefile nodelist nodes ntasks ntasks_per_core ntasks_per_gpu ntasks_per_node ntasks_per_socket open_mode output
overcommit oversubscribe parsable partition power priority profile propagate qos quiet reboot requeue reservation
signal sockets_per_node spread_job switches test_only thread_spec threads_per_core time time_min tmp uid
use_min_nodes verbose wait wait_all_nodes wckey wrap
""".split())
# submitit's own submission parameters (passed as slurm_<name>, not as raw sbatch lines)
SUBMITIT_PARAMETERS = frozenset(_get_default_parameters())
# set through launcher.* keys, or managed by submitit: not accepted in launcher.sbatch
OWNED = {"partition": "launcher.partition", "time": "launcher.time_min", "cpus_per_task": "launcher.cpus_per_task",
         "mem": "launcher.mem_gb", "gpus_per_node": "launcher.gpus_per_task", "gpus_per_task": "launcher.gpus_per_task",
         "gpus": "launcher.gpus_per_task", "num_gpus": "launcher.gpus_per_task",
         "array": "launcher.array_parallelism", "array_parallelism": "launcher.array_parallelism",
         "output": "submitit", "error": "submitit", "open_mode": "submitit", "signal": "submitit (USR2, for requeue)",
         "wrap": "submitit", "parsable": "submitit", "wait": "submitit", "map_count": "submitit",
         "additional_parameters": "launcher.sbatch itself"}
# sacct states after which an element will not run again
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
            "REVOKED", "SPECIAL_EXIT"}


def sbatch_parameters(extra: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate ``launcher.sbatch``: (submitit ``slurm_*`` parameters, ``slurm_additional_parameters``)."""
    named: dict[str, Any] = {}
    additional: dict[str, Any] = {}
    valid = sorted((SBATCH_OPTIONS | SUBMITIT_PARAMETERS) - set(OWNED))
    for raw, value in extra.items():
        key = str(raw).strip().lstrip("-").replace("-", "_").lower()
        if key in OWNED:
            raise UsageError(f"launcher.sbatch.{raw} is set by {OWNED[key]}, not launcher.sbatch")
        if key not in SBATCH_OPTIONS and key not in SUBMITIT_PARAMETERS:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            hint = f"closest valid names: {', '.join(close)}" if close else "see `sbatch --help` for valid names"
            raise UsageError(f"launcher.sbatch.{raw} is not an sbatch option: {hint}")
        if key in SUBMITIT_PARAMETERS:
            named[f"slurm_{key}"] = value
        else:
            additional[key.replace("_", "-")] = value
    return named, additional


class RunJob(submitit.helpers.Checkpointable):
    """One array element: execute its run directories (up to ``launcher.jobs_per_task``) in sequence in this one
    process, each isolated from the others as in a pool worker (``mpbench.worker.run_isolated``); returns the
    outcome per job id. A stop signal stops the running job at its next step (checkpointed) and starts no further
    one; after a USR2 the element requeues itself with the jobs it did not finish (see the module docstring)."""

    def __call__(self, args: dict[str, Any] | list[dict[str, Any]]) -> dict[str, str]:
        from mpbench.runner import StopFlag
        from mpbench.worker import DatasetCache, ProcessState, run_isolated, settle

        chunk = [args] if isinstance(args, dict) else list(args)
        self.outcomes: dict[str, str] = {}
        with _SignalLog() as signals:
            with StopFlag() as stop:            # between jobs too: a signal there starts no further job
                state, cache = ProcessState.capture(), DatasetCache()
                settle()
                for job in chunk:
                    if stop.flag.is_set():
                        break
                    self.outcomes[job["id"]] = run_isolated(job, state, cache)
        usr = SlurmJobEnvironment._usr_sig()
        unfinished = len(self.outcomes) < len(chunk) or "interrupted" in self.outcomes.values()
        if unfinished and usr in signals.seen:
            handler = signal.getsignal(usr)
            if isinstance(getattr(handler, "__self__", None), SignalHandler):
                signal.raise_signal(usr)        # submitit: checkpoint() -> scontrol requeue -> sys.exit
        return dict(self.outcomes)

    def checkpoint(self, args: dict[str, Any] | list[dict[str, Any]]) -> DelayedSubmission:
        """Requeue the jobs of this element it did not finish: the runner resumes each from its ``checkpoint.pt``.
        ``force`` is kept only while a job's old result has not been reset yet, so a requeued --force run resumes
        instead of restarting."""
        from mpbench.store import RunDir

        outcomes = getattr(self, "outcomes", {})
        todo = []
        for job in [args] if isinstance(args, dict) else list(args):
            got = outcomes.get(job["id"])
            if got not in (None, "interrupted"):
                continue                        # finished in this attempt
            if job.get("force"):
                old_result_kept = RunDir(Path(job["results"]), job["kind"], job["id"]).is_done
                job = {**job, "force": old_result_kept and got is None}
            todo.append(job)
        return DelayedSubmission(self, todo)


class _SignalLog:
    """Signal numbers delivered to Python handlers while active (``signal.set_wakeup_fd``)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def __enter__(self) -> "_SignalLog":
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        try:
            self._old = signal.set_wakeup_fd(self._w)
        except ValueError:                       # not the main thread: signals cannot be observed
            self._old = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.set_wakeup_fd(self._old)
        try:
            self.seen.update(os.read(self._r, 4096))
        except BlockingIOError:
            pass
        os.close(self._r)
        os.close(self._w)


def _folder(req: Request) -> Path:
    """A fresh submitit folder per launch: job ids restart at 1 on a new cluster, old result files must not match."""
    base = Path(req.launcher.folder) if req.launcher.folder else req.results / "slurm"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=base))


def _executor(req: Request, folder: Path, named: dict[str, Any], additional: dict[str, Any]) -> submitit.AutoExecutor:
    lc = req.launcher
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params: dict[str, Any] = {"name": f"mpbench-{req.plan.suite}", "timeout_min": int(lc.time_min),
                              "cpus_per_task": int(lc.cpus_per_task), "slurm_array_parallelism": int(lc.array_parallelism),
                              **named}
    if lc.partition:
        params["slurm_partition"] = lc.partition
    if lc.mem_gb:
        params["mem_gb"] = lc.mem_gb
    if lc.gpus_per_task:
        params["gpus_per_node"] = int(lc.gpus_per_task)
    if additional:
        params["slurm_additional_parameters"] = additional
    ex.update_parameters(**params)
    return ex


def validate_slurm(launcher: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the launcher.* settings and that Slurm is reachable, before anything is written or submitted."""
    for key, low in (("time_min", 1), ("cpus_per_task", 1), ("array_parallelism", 1), ("mem_gb", 0),
                     ("gpus_per_task", 0), ("jobs_per_task", 1)):
        if launcher[key] is None or launcher[key] < low:
            raise UsageError(f"launcher.{key} must be >= {low}, got {launcher[key]}")
    extra = OmegaConf.to_container(launcher.sbatch, resolve=True) if launcher.sbatch else {}
    params = sbatch_parameters(extra)
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise UsageError("launcher.name=slurm but sbatch/srun are not on PATH: run on a Slurm login node "
                         "(or use launcher.name=pool)")
    return params


@register_launcher("slurm", "a submitit job array per wave on Slurm; preempted/timed-out runs requeue and resume",
                   validate=validate_slurm)
def launch_slurm(req: Request, jobs: list[Job]) -> dict[str, str]:
    named, additional = validate_slurm(req.launcher)
    folder = _folder(req)
    ex = _executor(req, folder, named, additional)
    base = req.worker_args()
    gpu = bool(req.launcher.gpus_per_task)
    threads = int(req.launcher.threads or req.launcher.cpus_per_task)
    args = [{**base, "kind": j.kind, "id": j.id, "threads": threads,
             "device": "cuda:0" if gpu else "cpu"} for j in jobs]
    per = int(req.launcher.jobs_per_task)
    chunks = [args[i:i + per] for i in range(0, len(args), per)]
    try:
        with contextlib.redirect_stderr(io.StringIO()):     # submitit echoes sbatch's stderr: one line instead
            elements = ex.map_array(RunJob(), chunks)
        sjobs = [sjob for sjob, chunk in zip(elements, chunks) for _ in chunk]    # each job's element
    except (FailedJobError, FailedSubmissionError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines() or [""]
        why = lines[0].replace("sbatch: error: ", "")
        raise UsageError(f"sbatch refused the job array: {why} (check launcher.* and launcher.sbatch)") from None
    try:
        return _wait(req, jobs, sjobs)
    except KeyboardInterrupt:
        subprocess.run(["scancel", *sorted({_array_id(s) for s in sjobs})], check=False, capture_output=True)
        raise


def _array_id(sjob: SlurmJob) -> str:
    return str(sjob.job_id).split("_")[0]


def _result(sjob: SlurmJob) -> tuple[str, Any] | None:
    """submitit's result pickle of an element, or None when it has none yet."""
    if not sjob.paths.result_pickle.exists():
        return None
    try:
        return sjob._get_outcome_and_result()
    except Exception:  # noqa: BLE001 - being written, or unreadable: look again later
        return None


def _outcome(rd: RunDir, sjob: SlurmJob, state: str, mine: bool, terminal_s: float, grace_s: float) -> str | None:
    """The outcome of the job in ``rd`` once its element is finished (recording why in status.json if it died
    silently), else None. An element's result maps job ids to outcomes; a job it did not start (stopped first, or
    finished by an earlier attempt of a requeued element) has none."""
    terminal = state in TERMINAL
    res = _result(sjob)
    if res is not None and res[0] == "success":
        value = res[1].get(rd.id) if isinstance(res[1], dict) else res[1]
        if value is None:
            value = "done" if rd.is_done else "interrupted"
        if value != "interrupted" or terminal:
            return "done" if rd.is_done else str(value)
        return None
    if res is not None and res[0] == "error":
        error = [ln for ln in str(res[1]).strip().splitlines() if ln.strip()] or ["?"]
        why, transient = f"slurm job {sjob.job_id}: {error[-1].strip()}", False
    elif terminal and state == "CANCELLED" and not mine:
        return "interrupted"            # cancelled before it started (fail-fast, scancel): run dir untouched
    elif terminal and terminal_s > grace_s:
        why = f"slurm job {sjob.job_id} ended {state} without a result (log: {sjob.paths.stderr})"
        transient = state != "CANCELLED"
    else:
        return None
    if rd.is_done:
        return "done"
    if rd.status().get("state") != "failed":
        rd.update_status(state="failed", error=why, transient=transient)
    return "failed"


def _wait(req: Request, jobs: list[Job], sjobs: list[SlurmJob], poll_s: float = 1.0, sacct_s: float = 3.0,
          grace_s: float = 10.0) -> dict[str, str]:
    """Poll until every element is finished; return outcome per job id."""
    prog = req.progress
    watcher = SlurmJob.watcher
    watcher.clear()                  # cached states of earlier arrays (ids repeat on a fresh cluster)
    for s in sjobs:
        watcher.register_job(str(s.job_id))
    todo = dict(zip((j.id for j in jobs), zip(jobs, sjobs)))
    per_element = Counter(str(s.job_id) for s in sjobs)
    shared = {k for k, n in per_element.items() if n > 1}      # elements with several jobs
    started: set[str] = set()
    terminal_since: dict[str, float] = {}
    outcomes: dict[str, str] = {}
    last_sacct = 0.0
    while todo:
        if time.time() - last_sacct > sacct_s:
            watcher.update()
            last_sacct = time.time()
        for jid, (job, sjob) in list(todo.items()):
            rd = job.dir(req.results)
            st = rd.status()
            mine = str(st.get("slurm_job_id") or "").split("_")[0] == _array_id(sjob)
            if prog and jid not in started and mine and st.get("state") == "running":
                started.add(jid)
                prog.started(jid, st.get("total"))
            if prog and jid in started and st.get("step") is not None:
                prog.step(jid, int(st.get("step") or 0), int(st.get("total") or 1))
            state = watcher.get_state(str(sjob.job_id), mode="cache").split(" ")[0].upper()
            if state in TERMINAL:
                terminal_since.setdefault(jid, time.time())
            else:
                terminal_since.pop(jid, None)
            outcome: str | None
            if str(sjob.job_id) in shared and mine and rd.is_done and st.get("state") == "done":
                outcome = "done"                    # finished while its element runs the next job
            else:
                outcome = _outcome(rd, sjob, state, mine, time.time() - terminal_since.get(jid, time.time()),
                                   grace_s)
            if outcome is None:
                continue
            del todo[jid]
            outcomes[jid] = outcome
            if prog:
                if jid not in started:
                    prog.started(jid, st.get("total"))
                prog.finished(jid, outcome, outcome_detail(req, job, outcome))
        if req.fail_fast and "failed" in outcomes.values() and todo:
            subprocess.run(["scancel", "--state=PENDING", *sorted({_array_id(s) for _, s in todo.values()})],
                           check=False, capture_output=True)
        if todo:
            time.sleep(poll_s)
    return outcomes
