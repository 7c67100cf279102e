"""Runs per hour with several runs sharing one device (``mpbench bench packing``).

The paper's runs are small CNNs (ResNet-20 at 32 px): one run leaves most of a GPU idle between its kernel
launches, so ``launcher.slots`` runs per GPU share it. For each slot count the same suite (``runs`` equal base runs
of ``model`` on ``synthetic`` data at ``size`` px, batch ``batch``, ``steps`` steps, final evaluation only) runs
with the pool launcher on one device, driven as ``mpbench run`` drives it (``bench_makespan.time_suite``); runs/hour
= runs done / makespan (worker start-up included) and the gain over one slot. On a GPU, when
``nvidia-cuda-mps-control`` exists, the slot counts above 1 run once more under CUDA MPS (a private daemon started
for the measurement and stopped after it), which lets the runs' kernels share the GPU's SMs at once instead of
time-slicing. On a CPU the slots share the cores (``--threads`` per slot, default cores / slots).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from typing import Any, Iterator

from mpbench.errors import UsageError

MPS_CONTROL = "nvidia-cuda-mps-control"


@contextlib.contextmanager
def mps_daemon() -> Iterator[None]:
    """A private CUDA MPS control daemon for the block (its pipe and log dirs in a temporary dir, set in this
    process's environment so the pool's workers reach it); stopped and the environment put back after."""
    tmp = tempfile.mkdtemp(prefix="mpbench-mps-")
    env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(tmp, "pipe"), "CUDA_MPS_LOG_DIRECTORY": os.path.join(tmp, "log")}
    for d in env.values():
        os.makedirs(d)
    full = {**os.environ, **env}
    subprocess.run([MPS_CONTROL, "-d"], env=full, check=True, timeout=30, capture_output=True,
                   stdin=subprocess.DEVNULL)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run([MPS_CONTROL], input="quit\n", env=full, text=True, timeout=30, capture_output=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def _devices(device: str) -> Any:
    if device == "cpu":
        return "cpu"
    if device.split(":")[0] != "cuda":
        raise UsageError(f"bench packing: --device {device!r} is not valid: use cpu or cuda (or cuda:N)")
    from mpbench.launchers import visible_gpus

    gpus = visible_gpus()
    want = device.split(":")[1] if ":" in device else (gpus[0] if gpus else None)
    if want is None or want not in gpus:
        raise UsageError(f"bench packing: --device {device}: no such GPU here (visible: {gpus or 'none'}); "
                         f"use --device cpu")
    return [want]


def bench_packing(slots: tuple[int, ...] = (1, 2, 4, 8), runs: int | None = None, steps: int | None = None,
                  model: str = "resnet20", size: int = 32, batch: int = 128, device: str = "cpu",
                  threads: int | None = None, mps: bool = True) -> dict[str, Any]:
    """Measure every slot count (and under MPS where available); returns the settings and one row per setting."""
    from mpbench.fork import pin_driver

    pin_driver()                                  # before torch is imported: the workers can be forked
    from mpbench.bench_makespan import bench_suite, time_suite

    if not slots or min(slots) < 1:
        raise UsageError("bench packing: --slots must be positive slot counts, e.g. --slots 1 --slots 2")
    devices = _devices(device)
    runs = int(runs or max(slots))
    steps = int(steps or (300 if devices != "cpu" else 10))
    cores = os.cpu_count() or 1
    with_mps = devices != "cpu" and mps and shutil.which(MPS_CONTROL) is not None
    mps_note = (f"{MPS_CONTROL} not found: MPS not measured" if devices != "cpu" and mps and not with_mps
                else None)
    rows: list[dict[str, Any]] = []

    def measure(k: int, with_mps: bool) -> None:
        per_slot = int(threads or max(1, cores // k))
        t = time_suite(bench_suite(runs, k, steps, per_slot, model=model, size=size, batch=batch, devices=devices,
                                   model_kwargs={}))
        hours = t["makespan_s"] / 3600
        rows.append({"slots": k, "mps": with_mps, "threads": per_slot, "done": t["done"],
                     "makespan_s": t["makespan_s"], "runs_per_hour": t["done"] / hours if hours else 0.0,
                     "run_wall_s": sum(t["walls"]) / len(t["walls"]) if t["walls"] else None,
                     "forked": t["forked"]})

    for k in slots:
        measure(k, False)
    if with_mps:
        try:
            with mps_daemon():
                for k in (k for k in slots if k > 1):
                    measure(k, True)
        except (OSError, subprocess.SubprocessError) as e:
            mps_note = f"MPS not measured: `{MPS_CONTROL} -d` failed ({e})"
    base = next((r["runs_per_hour"] for r in rows if r["slots"] == 1 and not r["mps"]), None)
    for r in rows:
        r["gain"] = r["runs_per_hour"] / base if base else None
    return {"model": model, "size": size, "batch": batch, "steps": steps, "runs": runs, "device": device,
            "cores": cores, "rows": rows, "mps_note": mps_note}


def format_table(r: dict[str, Any]) -> str:
    head = (f"bench packing: {r['runs']} runs x {r['steps']} steps of base {r['model']} at {r['size']} px, batch "
            f"{r['batch']}, synthetic data, on {r['device']} ({r['cores']} cores); pool launcher, runs/hour from "
            f"the makespan (worker start-up included)")
    lines = [head, f"{'slots':>5} {'mps':>4} {'threads':>7} {'done':>5} {'makespan s':>10} {'run s':>7} "
                   f"{'runs/hour':>10} {'vs 1 slot':>9}"]
    for x in r["rows"]:
        gain = f"{x['gain']:.2f}x" if x["gain"] else "-"
        run_s = f"{x['run_wall_s']:.1f}" if x["run_wall_s"] is not None else "-"
        lines.append(f"{x['slots']:>5} {'yes' if x['mps'] else 'no':>4} {x['threads']:>7} {x['done']:>5} "
                     f"{x['makespan_s']:>10.1f} {run_s:>7} {x['runs_per_hour']:>10.0f} {gain:>9}")
    if r["mps_note"]:
        lines.append(r["mps_note"])
    return "\n".join(lines)
