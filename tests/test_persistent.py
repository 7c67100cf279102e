"""Persistent pool workers: one process per slot runs job after job, a job's numbers do not depend on what ran
before it in the same process, a killed worker is replaced and its job retried, a stopped driver leaves no worker
behind and resumable runs; the per-job process state put back (``mpbench.worker.ProcessState``)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mpbench.config import load_suite
from mpbench.launchers import Request, run_plan, write_plan
from mpbench.plan import expand
from mpbench.store import prepare_results_dir
from test_interrupts import _env, _statuses, _wait_gone, _worker_children
from test_slurm import SLURM, needs_slurm

POOL1 = ["launcher.name=pool", "launcher.slots=1", "launcher.threads=1"]


def _plan(suite: Path, results: Path, *overrides: str) -> Request:
    cfg = load_suite(str(suite), list(overrides))
    return Request(expand(cfg), cfg, prepare_results_dir(results), results.parent / "data")


def _by_steps(res: Path) -> dict[int, dict]:
    """status.json (plus its directory as ``dir``) of each run, by its train.steps."""
    out = {}
    for d in (res / "runs").iterdir():
        spec = json.loads((d / "result.json").read_text())["spec"] if (d / "result.json").exists() else None
        steps = spec["train"]["steps"] if spec else int(json.loads((d / "status.json").read_text()).get("total") or 0)
        out[steps] = {**json.loads((d / "status.json").read_text()), "dir": d}
    return out


def test_one_worker_runs_every_job_and_a_job_does_not_depend_on_what_ran_before(make_suite, tmp_path):
    """dropout after mixup and manifold_mixup (numpy's and torch's RNG, forward hooks) in one persistent worker
    ends with exactly the numbers it has alone in a fresh process (the one-job worker, run meanwhile)."""
    suite = make_suite(grid={"regularizer": ["mixup", "manifold_mixup", "dropout"]},
                       train={"steps": 12, "eval_every": 6})
    alone_req = _plan(suite, tmp_path / "alone" / "res", *POOL1, "grid.regularizer=[dropout]")
    write_plan(alone_req)
    [job] = alone_req.plan.runs
    args = {**alone_req.worker_args(), "kind": job.kind, "id": job.id, "threads": 1, "device": "cpu"}
    alone = subprocess.Popen([sys.executable, "-m", "mpbench.worker", json.dumps(args)], env=_env(tmp_path))
    after = tmp_path / "after" / "res"
    try:
        outcomes = run_plan(_plan(suite, after, *POOL1))
    finally:
        assert alone.wait(120) == 0
    assert set(outcomes.values()) == {"done"} and len(outcomes) == 3
    statuses = {d.name: json.loads((d / "status.json").read_text()) for d in (after / "runs").iterdir()}
    pids = {st["pid"] for st in statuses.values()}
    assert len(pids) == 1 and os.getpid() not in pids                   # one process ran all three, in order
    order = sorted(statuses, key=lambda k: statuses[k]["started"])
    assert [k.split("-")[0] for k in order] == ["mixup", "manifold_mixup", "dropout"]
    assert job.id == order[-1]                                           # the same job (same spec, same id)
    got = json.loads((after / "runs" / job.id / "result.json").read_text())
    ref = json.loads((alone_req.results / "runs" / job.id / "result.json").read_text())
    assert got["final"] == ref["final"]

    def rows(res: Path) -> list[dict]:
        lines = (res / "runs" / job.id / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(ln).items() if k not in ("time_s", "images_per_s")} for ln in lines]

    assert rows(after) == rows(alone_req.results)
    assert all((after / "runs" / k / "stdout.log").exists() for k in statuses)
    assert not _worker_children(os.getpid()), "the pool outlived its invocation"


def test_a_killed_worker_is_replaced_and_its_job_retried(make_suite, tmp_path):
    suite = make_suite(grid={"train.steps": [20, 150, 21]}, train={"eval_every": 0})
    req = _plan(suite, tmp_path / "res", *POOL1, "launcher.max_retries=1")
    res = req.results
    out: dict = {}
    driver = threading.Thread(target=lambda: out.update(run_plan(req)), daemon=True)
    driver.start()
    deadline, killed = time.time() + 90, None
    while time.time() < deadline and killed is None:
        for st in _statuses(res).values():
            if st.get("total") == 150 and st.get("state") == "running" and int(st.get("step") or 0) > 0:
                killed = int(st["pid"])
                os.kill(killed, signal.SIGKILL)                          # OOM killer, segfault
        time.sleep(0.02)
    assert killed is not None, _statuses(res)
    driver.join(120)
    assert not driver.is_alive()
    assert set(out.values()) == {"done"} and len(out) == 3, out
    runs = _by_steps(res)
    assert runs[20]["pid"] == killed                                     # it had run the first job already
    assert runs[150]["attempts"] == 2 and runs[150]["pid"] != killed     # retried by run_plan, in its successor
    assert runs[21]["pid"] == runs[150]["pid"] and runs[21]["attempts"] == 1
    result = json.loads((runs[150]["dir"] / "result.json").read_text())
    assert result["attempts"] == 2 and not result["resumed"]             # no checkpoint: from step 0


def test_sigterm_with_persistent_workers_leaves_no_worker_and_resumable_runs(make_suite, tmp_path):
    """SIGTERM to the driver (this process, as `mpbench run`'s launcher runs in it) while the long run trains in a
    worker that already ran a job and the other worker is idle: both end before the driver stops (Stopped, exit
    code 143), and the long run resumes from its checkpoint."""
    import torch

    from mpbench.runner import Stopped

    suite = make_suite(grid={"train.steps": [20, 21, 500]}, train={"eval_every": 0, "checkpoint_every": 0})
    res = tmp_path / "res"
    seen: dict = {}

    def send_sigterm() -> None:                 # once the long run trains: the launcher's StopFlag is installed
        deadline = time.time() + 90
        while time.time() < deadline:
            statuses = list(_statuses(res).values())
            long = next((st for st in statuses if st.get("total") == 500
                         and st.get("state") == "running" and int(st.get("step") or 0) > 0), None)
            if long is not None and sum(st.get("state") == "done" for st in statuses) == 2:
                seen["workers"] = _worker_children(os.getpid())
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    sender = threading.Thread(target=send_sigterm, daemon=True)
    sender.start()
    with pytest.raises(Stopped) as info:
        run_plan(_plan(suite, res, "launcher.name=pool", "launcher.slots=2", "launcher.threads=1"))
    sender.join(5)
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert len(seen["workers"]) == 2                                     # one busy, one idle
    assert not _wait_gone(seen["workers"], 5) and not _worker_children(os.getpid()), "a worker outlived the stop"
    runs = _by_steps(res)
    assert {runs[20]["state"], runs[21]["state"]} == {"done"}
    assert runs[500]["pid"] in {runs[20]["pid"], runs[21]["pid"]}       # the same process ran a job before
    st = runs[500]
    assert st["state"] == "pending" and "stopped at step" in st["note"] and (st["dir"] / "checkpoint.pt").exists()
    assert f"{st['dir'].name} at step {st['checkpoint_step']}" in str(info.value)
    assert not list(res.glob("runs/*/lock"))
    threads = torch.get_num_threads()
    try:                                                                 # the rerun, in process to save a start-up
        assert run_plan(_plan(suite, res, "launcher.threads=1"))[st["dir"].name] == "done"
    finally:
        torch.set_num_threads(threads)
    result = json.loads((st["dir"] / "result.json").read_text())
    assert result["resumed"] is True and result["resumed_from_step"] == st["checkpoint_step"]
    assert result["attempts"] == 2


def test_process_state_is_put_back_after_a_job():
    import random

    import numpy as np
    import torch

    from mpbench.worker import ProcessState

    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    draws = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    state = ProcessState.capture()
    threads = torch.get_num_threads()
    usr1 = signal.getsignal(signal.SIGUSR1)
    try:
        torch.set_num_threads(threads + 1)                       # what a job may leave behind
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_default_dtype(torch.float64)
        torch.set_grad_enabled(False)
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
        torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
        signal.signal(signal.SIGUSR1, lambda *a: None)
        os.environ["MPBENCH_TEST_LEAK"] = "1"
        torch.manual_seed(99), np.random.seed(99), random.seed(99)
        state.restore()
        assert torch.get_num_threads() == threads
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()
        assert torch.get_float32_matmul_precision() == state.matmul_precision
        assert torch.backends.cudnn.benchmark == state.flags[("cudnn", "benchmark")]
        assert not torch.nn.modules.module._global_forward_hooks
        assert signal.getsignal(signal.SIGUSR1) == usr1 and "MPBENCH_TEST_LEAK" not in os.environ
        assert torch.equal(torch.rand(3), draws[0])                 # every RNG as at capture
        assert np.array_equal(np.random.rand(3), draws[1]) and random.random() == draws[2]
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
        torch.set_default_dtype(torch.float32)
        torch.set_grad_enabled(True)
        torch.nn.modules.module._global_forward_hooks.clear()
        signal.signal(signal.SIGUSR1, usr1)
        os.environ.pop("MPBENCH_TEST_LEAK", None)


@pytest.mark.parametrize("jobs_per_task", [0, 2])
def test_jobs_per_task_is_validated(make_suite, cli, tmp_path, jobs_per_task):
    code, _, err = cli("run", f"suite={make_suite()}", f"launcher.jobs_per_task={jobs_per_task}", "--dry-run",
                       "--results", tmp_path / "res")
    assert (code == 2 and "launcher.jobs_per_task" in err) if jobs_per_task == 0 else code == 0, err


@needs_slurm
def test_slurm_jobs_per_task_runs_jobs_in_sequence_in_one_element(make_suite, cli, tmp_path):
    suite = make_suite(grid={"seed": [0, 1, 2]})
    code, _, err = cli("run", f"suite={suite}", *SLURM, "launcher.jobs_per_task=2",
                       f"launcher.folder={tmp_path / 'submitit'}", "--results", tmp_path / "res",
                       "--data", tmp_path / "data")
    assert code == 0, err
    statuses = [json.loads(f.read_text()) for f in sorted((tmp_path / "res").glob("runs/*/status.json"))]
    assert [st["state"] for st in statuses] == ["done"] * 3
    elements: dict[str, set] = {}
    for st in statuses:
        elements.setdefault(st["slurm_job_id"], set()).add(st["pid"])
    assert sorted(len(pids) for pids in elements.values()) == [1, 1]      # 2 elements, one process each
    assert len({k.split("_")[0] for k in elements}) == 1                  # one array
    assert sorted(sum(st["slurm_job_id"] == k for st in statuses) for k in elements) == [1, 2]


def test_bench_makespan_prints_its_table(cli):
    code, out, err = cli("bench", "makespan", "--runs", "2", "--slots", "2", "--steps", "4", "--threads", "1")
    assert code == 0, err
    for row in ("makespan", "sum of wall_time_s", "ideal = sum / slots", "ratio", "2 runs x 4 steps",
                "persistent workers (2 worker processes", "runs done  2/2"):
        assert row in out, out
