"""Interrupts never lose work: Ctrl-C, SIGTERM and SIGHUP of `mpbench run` (local and pool launchers) checkpoint
every training run and stop; the driver exits 128 + the signal's number, no worker outlives it, no status is left
`running`, and rerunning the same command resumes each run from its checkpoint and finishes it exactly once. A pool
worker whose driver is killed (SIGKILL) stops by itself. `mpbench status` never shows a dead process as running.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mpbench.claim import HOST, pid_alive
from mpbench.regularization import REGULARIZERS, Regularizer, register_regularizer
from mpbench.store import RunDir, write_json

SUITE = {
    "name": "interrupts",
    "grid": {"regularizer": ["base"], "model": ["conv4"], "dataset": ["synthetic"], "seed": [0, 1]},
    "train": {"steps": 400, "batch_size": 32, "eval_batch_size": 100, "checkpoint_every": 0},
    "model_kwargs": {"width": 8},
    "launcher": {"threads": 1},
}
LAUNCHER_ARGS = {"local": [], "pool": ["launcher.name=pool", "launcher.slots=2"]}
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


def _env(tmp: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                WANDB_DIR=str(tmp / "wandb"), MPBENCH_DATA=str(tmp / "data"))


def _cmd(suite: Path, res: Path, launcher: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mpbench.cli", "run", f"suite={suite}", "--results", str(res),
            *LAUNCHER_ARGS[launcher], *extra]


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    path = tmp_path / "interrupts.yaml"
    path.write_text(yaml.safe_dump(SUITE))
    return path


def _statuses(res: Path) -> dict[str, dict]:
    out = {}
    for f in res.glob("runs/*/status.json"):
        try:
            out[f.parent.name] = json.loads(f.read_text())
        except (OSError, ValueError):
            continue                                   # never half-written, but may be missing for a moment
    return out


def _lock_pids(res: Path) -> set[int]:
    pids = set()
    for f in res.glob("runs/*/lock"):
        try:
            pids.add(int(json.loads(f.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            continue
    return pids


def _worker_children(pid: int) -> set[int]:
    """Live pool workers whose parent is ``pid`` (from /proc): `python -m mpbench.worker` processes, and workers
    forked from the driver (named ``mpbench-worker``)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            ppid = int(text.rsplit(")", 1)[1].split()[1])
            forked = "(mpbench-worker)" in text
            if ppid == pid and (forked or b"mpbench.worker" in (stat.parent / "cmdline").read_bytes()):
                found.add(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _wait_training(res: Path, runs: int, proc: subprocess.Popen, timeout: float = 90) -> dict[str, dict]:
    """Block until ``runs`` runs are recorded running at a step > 0; return their statuses."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "mpbench run ended before it could be interrupted"
        statuses = _statuses(res)
        assert all(st.get("state") != "done" for st in statuses.values()), "a run finished first: raise its steps"
        training = {k: st for k, st in statuses.items()
                    if st.get("state") == "running" and int(st.get("step") or 0) > 0}
        if len(training) >= runs:
            return training
        time.sleep(0.02)
    raise AssertionError(f"{runs} run(s) did not start training within {timeout} s: {_statuses(res)}")


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    return {p for p in pids if pid_alive(p)}


def _check_stopped(res: Path, training: dict[str, dict]) -> dict[str, int]:
    """Nothing left running or claimed; each run that was training has a checkpoint; returns their steps."""
    statuses = _statuses(res)
    assert all(st.get("state") != "running" for st in statuses.values()), statuses
    assert not list(res.glob("runs/*/lock")), "a claim outlived its process"
    steps = {}
    for rid in training:
        st = statuses[rid]
        assert st["state"] == "pending" and "stopped at step" in st["note"], st
        assert (res / "runs" / rid / "checkpoint.pt").exists(), rid
        steps[rid] = int(st["checkpoint_step"])
        assert 0 < steps[rid] < SUITE["train"]["steps"], st
    for rid in set(statuses) - set(training):
        assert not (res / "runs" / rid / "checkpoint.pt").exists()
    return steps


def _rerun_resumes(cli, suite: Path, res: Path, launcher: str, tmp: Path, steps: dict[str, int],
                   *extra: str) -> None:
    """The same command again (in this process, to save a start-up): every run done exactly once, the interrupted
    ones resumed from the step they checkpointed."""
    import torch

    threads = torch.get_num_threads()
    try:
        code, _, err = cli(*_cmd(suite, res, launcher, *extra)[3:], "--data", tmp / "data")
    finally:
        torch.set_num_threads(threads)             # the local launcher set launcher.threads in this process
    assert code == 0, err
    runs = sorted(d for d in (res / "runs").iterdir())
    assert len(runs) == (1 if "grid.seed=[0]" in extra else 2)
    for d in runs:
        assert (d / "done").exists() and not (d / "checkpoint.pt").exists() and not (d / "lock").exists()
        result = json.loads((d / "result.json").read_text())
        status = json.loads((d / "status.json").read_text())
        assert status["state"] == "done"
        if d.name in steps:
            assert f"resuming {d.name} from step {steps[d.name]}" in err, err
            assert result["resumed"] is True and result["resumed_from_step"] == steps[d.name]
            assert result["attempts"] == status["attempts"] == 2
        else:
            assert result["resumed"] is False and result["attempts"] == status["attempts"] == 1


@pytest.mark.parametrize("launcher", ["local", "pool"])
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_signal_to_mpbench_run_checkpoints_stops_and_the_rerun_resumes(cli, suite, tmp_path, launcher, sig):
    res = tmp_path / "res"
    # local: 2 runs, the second never starts; pool: 2 workers for SIGTERM, 1 for the others (start-ups are slow)
    extra = ("grid.seed=[0]",) if launcher == "pool" and sig != signal.SIGTERM else ()
    n_training = 1 if launcher == "local" or extra else 2
    proc = subprocess.Popen(_cmd(suite, res, launcher, *extra), env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        training = _wait_training(res, n_training, proc)
        workers = _worker_children(proc.pid) | _lock_pids(res) | {int(st["pid"]) for st in training.values()}
        if launcher == "pool":
            assert len(_worker_children(proc.pid)) == n_training
        os.kill(proc.pid, sig)                                   # the driver only, as kill/timeout/systemd do
        _, err = proc.communicate(timeout=60)                    # it stops within 60 s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    last = err.strip().splitlines()[-1]
    assert f"stopped by {name}" in last and "rerun the same command to resume" in last, err
    assert not _wait_gone(workers - {proc.pid}, 5), "a worker outlived its driver"
    steps = _check_stopped(res, training)
    assert all(f"{rid} at step {step}" in last for rid, step in steps.items()), last
    _rerun_resumes(cli, suite, res, launcher, tmp_path, steps, *extra)


def test_pool_workers_stop_by_themselves_when_the_driver_is_killed(suite, tmp_path):
    res = tmp_path / "res"
    proc = subprocess.Popen(_cmd(suite, res, "pool"), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    workers: set[int] = set()
    try:
        training = _wait_training(res, 2, proc)
        workers = _worker_children(proc.pid)
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)                        # no chance to forward anything
        proc.wait(timeout=10)
        assert not _wait_gone(workers, 60), "pool workers outlived their killed driver"
    finally:
        for pid in workers:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    _check_stopped(res, training)                                # each checkpointed and recorded its stop


def test_worker_notices_its_parent_is_gone_without_pdeathsig(tmp_path):
    """The fallback where PR_SET_PDEATHSIG is unavailable or came too late: a changed parent pid means SIGTERM."""
    flag = tmp_path / "stopped"
    worker = ("import pathlib, signal, sys, time; from mpbench.worker import watch_parent; "
              "signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path(sys.argv[2]).write_text('x'), sys.exit(7))); "
              "watch_parent(int(sys.argv[1]), 0.05); time.sleep(30)")
    parent = ("import os, subprocess, sys, time; "
              "subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid()), sys.argv[2]]); time.sleep(0.5)")
    subprocess.run([sys.executable, "-c", parent, worker, str(flag)], timeout=60)    # exits, leaving its child
    deadline = time.time() + 30
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), "the worker did not notice that its parent died"


# --- in-process: StopFlag, a second Ctrl-C -----------------------------------------------------------------------

def test_stop_flags_nest_and_a_second_ctrl_c_aborts():
    from mpbench.runner import StopFlag

    before = signal.getsignal(signal.SIGTERM)
    with StopFlag() as outer:
        with StopFlag() as inner:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert inner.flag.is_set() and inner.signum == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGHUP)                  # a repeated stop signal changes nothing
            time.sleep(0.01)
        assert outer.flag.is_set() and outer.signum == signal.SIGTERM   # the launcher sees what its run saw
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)                  # second: abort now
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)           # `nohup mpbench run ...` survives a logout
    try:
        with StopFlag():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


PRESS = {"at": None, "times": 0}

if "test_ctrl_c" not in REGULARIZERS:
    @register_regularizer("test_ctrl_c")
    class CtrlC(Regularizer):
        """Test-only: presses Ctrl-C ``PRESS['times']`` times at step ``PRESS['at']`` (in-process launchers only)."""

        citation = "test fixture"

        def begin_step(self, step):
            if step == PRESS["at"]:
                for _ in range(PRESS["times"]):
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.01)                            # the handler runs before the next press


@pytest.mark.parametrize("times", [1, 2])
def test_ctrl_c_in_process_once_checkpoints_twice_aborts_never_leaving_running(make_suite, tmp_path, times):
    from mpbench.config import load_suite
    from mpbench.launchers import Request, run_plan
    from mpbench.plan import expand
    from mpbench.runner import Stopped
    from mpbench.store import prepare_results_dir

    suite = make_suite(grid={"regularizer": ["test_ctrl_c"], "seed": [0, 1]}, train={"steps": 8, "eval_every": 0})
    res = prepare_results_dir(tmp_path / "res")

    def run() -> dict:
        cfg = load_suite(str(suite), ["launcher.threads=1"])
        return run_plan(Request(expand(cfg), cfg, res, tmp_path / "data"))

    PRESS.update(at=3, times=times)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            run()
    finally:
        PRESS.update(at=None, times=0)
    statuses = _statuses(res)
    first = next(k for k, st in statuses.items() if st.get("attempts"))
    assert len([st for st in statuses.values() if st.get("attempts")]) == 1       # the suite stopped there
    st = statuses[first]
    assert st["state"] == "pending" and not (res / "runs" / first / "lock").exists()
    if times == 1:
        assert isinstance(info.value, Stopped) and info.value.exit_code == 130
        assert st["checkpoint_step"] == 4 and (res / "runs" / first / "checkpoint.pt").exists()
        assert f"{first} at step 4" in str(info.value)
    else:
        assert not isinstance(info.value, Stopped)
        assert "interrupted before its checkpoint" in st["note"]
        assert not (res / "runs" / first / "checkpoint.pt").exists()
    assert set(run().values()) == {"done"}
    result = json.loads((res / "runs" / first / "result.json").read_text())
    assert result["attempts"] == 2 and result["resumed"] is (times == 1)
    assert result["resumed_from_step"] == (4 if times == 1 else None)


# --- mpbench status ------------------------------------------------------------------------------------------------

def test_status_never_shows_a_dead_process_as_running(cli, tmp_path):
    res = tmp_path / "res"
    for sub in ("runs", "artifacts", "suites"):
        (res / sub).mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                                  # a pid that is gone
    now = time.time()

    def running(rid: str, pid: int, host: str = HOST, lock: dict | None = None, checkpoint: bool = False) -> None:
        rd = RunDir(res, "run", rid)
        rd.create(rid, {})
        rd.update_status(state="running", step=35, total=100, host=host, pid=pid, attempts=1)
        if lock is not None:
            write_json(rd.lock_file, {"host": host, "pid": pid, "started": now, "heartbeat": now, **lock})
        if checkpoint:
            rd.checkpoint.write_bytes(b"checkpoint")

    running("dead-pid", dead.pid, lock={}, checkpoint=True)
    running("no-lock", dead.pid)
    running("silent", 4242, host="elsewhere", lock={"heartbeat": now - 1000, "stale_after_s": 300})
    running("alive", os.getpid(), lock={})
    running("alive-elsewhere", 4242, host="elsewhere", lock={})
    write_json(res / "suites" / "s.json", {"name": "s", "runs": ["dead-pid", "no-lock", "silent", "alive",
                                                                 "alive-elsewhere"], "artifacts": []})
    code, out, err = cli("status", "suite=s", "--results", res, "--format", "json")
    assert code == 0, err
    [s] = json.loads(out)
    jobs = {j["id"]: j for j in s["not_done"]}
    assert s["counts"]["interrupted"] == 3 and s["counts"]["running"] == 2
    assert {k for k, j in jobs.items() if j["state"] == "running"} == {"alive", "alive-elsewhere"}
    assert jobs["dead-pid"]["detail"] == (f"process {dead.pid} on {HOST} is gone; "
                                          f"rerun to resume from its checkpoint")
    assert f"process {dead.pid} on {HOST} is gone" in jobs["no-lock"]["detail"]
    assert "restart" in jobs["no-lock"]["detail"]                # no checkpoint: says it starts again
    assert "process 4242 on elsewhere sent no heartbeat" in jobs["silent"]["detail"]
    code, out, _ = cli("status", "suite=s", "--results", res)
    assert code == 0 and "interrupted 3" in out and "running 2" in out
