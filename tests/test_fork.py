"""Pool workers forked from the driver (``mpbench.fork``): `mpbench run` forks them where it is safe, they compute
exactly what exec'd workers compute, and every reason fork is not safe turns it off (the exec'd worker runs)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import torch

from mpbench import fork
from test_interrupts import _env

POOL = ["launcher.name=pool", "launcher.slots=2", "launcher.threads=1"]


def _run(suite: Path, res: Path, tmp: Path, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "mpbench.cli", "run", f"suite={suite}", "--results", str(res),
                           *POOL], env={**_env(tmp), **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return "".join(f.read_text() for f in sorted((res / "pool").glob("slot*.log")))


def _numbers(res: Path) -> dict[str, tuple]:
    out = {}
    for d in sorted((res / "runs").iterdir()):
        rows = [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "images_per_s")}
                for line in (d / "metrics.jsonl").read_text().splitlines()]
        out[d.name] = (json.loads((d / "result.json").read_text())["final"], rows)
    return out


def test_forked_workers_compute_what_exec_workers_compute(make_suite, tmp_path):
    """Three runs (dropout: torch's RNG in the forward) on 2 forked slots, then on 2 exec'd ones: the same
    numbers, bit for bit; the slot logs say how each worker started."""
    suite = make_suite(grid={"regularizer": ["base", "dropout"], "seed": [0, 1]}, train={"steps": 12, "eval_every": 6})
    forked_log = _run(suite, tmp_path / "forked", tmp_path)
    exec_log = _run(suite, tmp_path / "exec", tmp_path, MPBENCH_WORKER_START="exec")
    assert forked_log.count("worker forked from the driver") == 2, forked_log
    assert exec_log.count("not forked: MPBENCH_WORKER_START=exec") == 2, exec_log
    forked, execd = _numbers(tmp_path / "forked"), _numbers(tmp_path / "exec")
    assert len(forked) == 4 and forked == execd
    pids = {json.loads((d / "status.json").read_text())["pid"] for d in (tmp_path / "forked" / "runs").iterdir()}
    assert len(pids) == 2                                        # each forked worker ran jobs in turn


def test_nothing_unsafe_is_forked(monkeypatch):
    """This test process imported torch without pinning it: no fork; and each other condition turns it off."""
    assert "pin_driver" in (fork.unavailable() or "")
    monkeypatch.setattr(threading, "active_count", lambda: 1)      # earlier tests may have left daemon threads
    monkeypatch.setitem(fork._PINNED, "driver", True)
    monkeypatch.setitem(fork._PINNED, "native_threads", fork._native_threads())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fork.unavailable() is None
        assert "GPU slot" in (fork.unavailable(gpu=True) or "")
        monkeypatch.setenv(fork.START_ENV, "fork")
        assert fork.unavailable(gpu=True) is None
        monkeypatch.setenv(fork.START_ENV, "exec")
        assert fork.START_ENV in (fork.unavailable() or "")
        monkeypatch.delenv(fork.START_ENV)
        torch.set_num_threads(2)
        assert "2 threads" in (fork.unavailable() or "")
        torch.set_num_threads(1)
        monkeypatch.setattr(threading, "active_count", lambda: 2)
        assert "other thread" in (fork.unavailable() or "")
        monkeypatch.setattr(threading, "active_count", lambda: 1)
        monkeypatch.setitem(fork._PINNED, "native_threads", fork._native_threads() - 1)   # a pool started since
        assert "native thread" in (fork.unavailable() or "")
        monkeypatch.setitem(fork._PINNED, "native_threads", fork._native_threads())
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        assert "CUDA" in (fork.unavailable() or "")
    finally:
        torch.set_num_threads(threads)


def test_pin_driver_pins_a_fresh_process_only():
    code = ("import sys; from mpbench import fork; fork.pin_driver(); import torch; "
            "print(fork._PINNED['driver'], torch.get_num_threads(), fork.unavailable())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**_env(Path("/tmp")), "OMP_NUM_THREADS": "2"}).stdout.split()
    assert out[:3] == ["True", "1", "None"], out
    ran = ("from mpbench import fork; fork.pin_driver(); import torch; torch.set_num_threads(2); "
           "x = torch.randn(512, 512); x @ x; torch.set_num_threads(1); print(fork.unavailable())")
    out = subprocess.run([sys.executable, "-c", ran], capture_output=True, text=True, timeout=120,
                         env=_env(Path("/tmp"))).stdout                  # the hang of the module docstring, refused
    assert "native thread" in out, out
    late = "import torch; from mpbench import fork; fork.pin_driver(); print(fork._PINNED['driver'])"
    assert subprocess.run([sys.executable, "-c", late], capture_output=True, text=True, timeout=120,
                          env=_env(Path("/tmp"))).stdout.strip() == "False"


def test_a_killed_forked_worker_is_replaced_by_a_forked_one_and_its_job_retried(make_suite, tmp_path):
    import os
    import signal
    import time

    from test_interrupts import _statuses

    suite = make_suite(grid={"train.steps": [20, 400, 21]}, train={"eval_every": 0})
    res = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-m", "mpbench.cli", "run", f"suite={suite}", "--results", str(res),
                             "launcher.name=pool", "launcher.slots=1", "launcher.threads=1",
                             "launcher.max_retries=1"], env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.time() + 120
    while killed is None and time.time() < deadline and proc.poll() is None:
        for st in _statuses(res).values():
            if st.get("total") == 400 and st.get("state") == "running" and int(st.get("step") or 0) > 0:
                killed = int(st["pid"])
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    _, err = proc.communicate(timeout=180)
    assert killed is not None and proc.returncode == 0, err
    statuses = _statuses(res)
    assert all(st["state"] == "done" for st in statuses.values()) and len(statuses) == 3
    long = next(st for st in statuses.values() if st["total"] == 400)
    assert long["attempts"] == 2 and long["pid"] != killed
    log = (res / "pool" / "slot0.log").read_text()
    assert log.count("worker forked from the driver") == 2, log
