"""Fault injection: kill -9 of the runner and of a pool worker, concurrent runners, NaN, misconfigured W&B.

Every scenario ends with: each run done exactly once (attempts counted in status.json), every result file
valid, and resumed runs' metrics equal to an uninterrupted reference run (bitwise: 1 thread, CPU).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

SUITE = {
    "name": "faults",
    "grid": {"regularizer": ["base", "dropout"], "model": ["conv4"], "dataset": ["synthetic"], "seed": [0, 1]},
    "train": {"steps": 600, "batch_size": 32, "eval_every": 200, "eval_batch_size": 200, "checkpoint_every": 25},
    "model_kwargs": {"width": 16},
    "launcher": {"threads": 1, "stale_after_s": 60},
}


def _env(tmp: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
                WANDB_DIR=str(tmp / "wandb"), MPBENCH_DATA=str(tmp / "data"))


def _cmd(suite: Path, res: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mpbench.cli", "run", f"suite={suite}", "--results", str(res), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The suite run once without faults: final metrics per run id."""
    tmp = tmp_path_factory.mktemp("ref")
    suite = tmp / "faults.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    res = tmp / "res"
    subprocess.run(_cmd(suite, res), env=_env(tmp), check=True, capture_output=True, timeout=300)
    return suite, {d.name: json.loads((d / "result.json").read_text())["final"] for d in (res / "runs").iterdir()}


def _wait_for_step(res: Path, min_step: int, pid: int | None = None, timeout: float = 120) -> dict:
    """Block until some run is running at step >= min_step (in process ``pid`` if given); return its status."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for st_file in res.glob("runs/*/status.json"):
            try:
                st = json.loads(st_file.read_text())
            except (OSError, ValueError):
                continue
            if st.get("state") == "running" and int(st.get("step") or 0) >= min_step and pid in (None, st.get("pid")):
                return {**st, "dir": st_file.parent}
        time.sleep(0.05)
    raise AssertionError("no run reached the kill step in time")


def _check_all_done_once(res: Path, reference: dict, killed: set[str], attempts: dict | None = None) -> None:
    runs = {d.name: d for d in (res / "runs").iterdir()}
    assert set(runs) == set(reference)                                   # runs lost = 0
    for name, d in runs.items():
        assert (d / "done").exists()
        result = json.loads((d / "result.json").read_text())             # valid JSON, not half-written
        assert result["final"] == reference[name], name                  # resumed == uninterrupted
        status = json.loads((d / "status.json").read_text())
        assert status["state"] == "done"
        expected = attempts[name] if attempts else 2 if name in killed else 1    # duplicates = 0
        assert status["attempts"] == expected, (name, status)
        assert not (d / "lock").exists() and not (d / "checkpoint.pt").exists()


def test_kill_9_runner_then_rerun_resumes(reference, tmp_path):
    suite, ref = reference
    res = tmp_path / "res"
    rng = random.Random(1)
    killed = set()
    for round_ in range(2):                                              # two kills at random steps
        proc = subprocess.Popen(_cmd(suite, res), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        st = _wait_for_step(res, rng.randrange(100, 500), pid=proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed.add(st["dir"].name)
    out = subprocess.run(_cmd(suite, res), env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert all(json.loads((res / "runs" / k / "result.json").read_text())["resumed"] for k in killed)
    attempts = {d.name: json.loads((d / "status.json").read_text())["attempts"] for d in (res / "runs").iterdir()}
    assert sum(attempts.values()) == len(attempts) + 2                  # one extra execution per kill, no more
    _check_all_done_once(res, ref, killed, attempts)


def test_kill_9_pool_worker_is_retried_and_resumes(reference, tmp_path):
    suite, ref = reference
    res = tmp_path / "res"
    proc = subprocess.Popen(_cmd(suite, res, "launcher.name=pool", "launcher.slots=2", "launcher.max_retries=1"),
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    st = _wait_for_step(res, random.Random(2).randrange(100, 500))
    os.kill(int(st["pid"]), signal.SIGKILL)                              # the worker, not the runner
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _check_all_done_once(res, ref, {st["dir"].name})
    assert json.loads((st["dir"] / "result.json").read_text())["resumed"]


def test_two_concurrent_runners_execute_each_run_once(reference, tmp_path):
    suite, ref = reference
    res = tmp_path / "res"
    procs = [subprocess.Popen(_cmd(suite, res), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    _check_all_done_once(res, ref, set())


def test_nan_run_is_marked_failed_in_the_report(cli, make_suite, tmp_path):
    suite = make_suite(grid={"regularizer": ["base", "test_nan"], "seed": [0, 1]})
    res = tmp_path / "res"
    code, _, err = cli("run", f"suite={suite}", "--results", res)
    assert code == 1 and "2 failed" in err
    code, out, _ = cli("report", "suite=tiny", "--results", res, "--format", "markdown")
    assert code == 0 and "failed runs: 2" in out.replace("*", "")


def test_misconfigured_wandb_never_fails_or_stalls_a_run(make_suite, tmp_path):
    suite = make_suite(wandb={"mode": "online"})
    env = _env(tmp_path)
    env.pop("WANDB_MODE")
    env.update(WANDB_API_KEY="bogus" * 8, WANDB_BASE_URL="https://127.0.0.1:9")   # nothing listens there
    t0 = time.time()
    out = subprocess.run(_cmd(suite, tmp_path / "res"), env=env, capture_output=True, text=True, timeout=120)
    took = time.time() - t0
    assert out.returncode == 0, out.stderr
    assert "W&B" in out.stderr                                           # a warning, not a failure
    assert took < 60                                                     # not W&B's 90 s init timeout
    assert len(list((tmp_path / "res").glob("runs/*/done"))) == 1
