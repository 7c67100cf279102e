"""`mpbench bench packing`: runs/hour per slot count on one device, CUDA MPS under a private daemon."""
from __future__ import annotations

import os
from pathlib import Path

from mpbench import bench_packing


def test_bench_packing_prints_one_row_per_slot_count(cli):
    code, out, err = cli("bench", "packing", "--slots", "1", "--slots", "2", "--runs", "2", "--steps", "2",
                         "--model", "conv4", "--size", "16", "--batch", "16", "--threads", "1")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "2 runs x 2 steps of base conv4 at 16 px, batch 16" in lines[0] and "on cpu" in lines[0]
    rows = [ln.split() for ln in lines[2:]]
    assert [r[0] for r in rows] == ["1", "2"] and all(r[3] == "2" for r in rows)     # every run done
    assert rows[0][-1] == "1.00x" and float(rows[1][-1].rstrip("x")) > 0


def test_bench_packing_refuses_a_device_it_cannot_use(cli, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code, _, err = cli("bench", "packing", "--device", "cuda")
    assert code == 2 and "no such GPU here" in err and "--device cpu" in err
    code, _, err = cli("bench", "packing", "--device", "tpu")
    assert code == 2 and "use cpu or cuda" in err


def test_mps_daemon_is_private_reaches_the_workers_and_is_stopped(tmp_path, monkeypatch):
    """A stand-in nvidia-cuda-mps-control records its calls: started with -d and private pipe/log dirs, which
    this process's environment (so the pool's workers) holds during the block; told to quit after; env put back."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / bench_packing.MPS_CONTROL
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@ pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$(cat)" >> {calls}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    with bench_packing.mps_daemon():
        pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
        assert Path(pipe).is_dir() and Path(os.environ["CUDA_MPS_LOG_DIRECTORY"]).is_dir()
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not Path(pipe).exists()
    start, stop = calls.read_text().splitlines()
    assert start.startswith("-d pipe=" + pipe) and stop == f" pipe={pipe} stdin=quit"
