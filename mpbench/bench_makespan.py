"""How busy the pool launcher keeps its slots (``mpbench bench makespan``).

A fixed synthetic suite (``runs`` equal runs: base, Conv-4 width 8, ``synthetic``, ``steps`` steps of batch 32, final
evaluation only, one seed each) runs with the pool launcher on ``slots`` CPU slots in a fresh results dir, driven
from this process as ``mpbench run`` drives it after planning (``launchers.warm_up``, then ``launchers.run_plan``;
the workers are forked from this process where ``mpbench.fork`` allows it, i.e. when torch was not imported before
the bench started). Measured end to end: the makespan (from ``warm_up``'s call, so including the workers'
start-up, to ``run_plan``'s return), the sum of the runs' in-process wall times (``result.json`` ``wall_time_s``),
ideal = sum / slots, and ratio = makespan / ideal (1.00x: no slot ever idle; the workers' start-up and the
hand-over between jobs are what is above it; "ratio after start-up" leaves the one-time start-up out).
``per_job_process`` measures the launcher as it was before persistent workers: a fresh ``python -m mpbench.worker``
(imports included) per job.
The machine's load average before and after is printed too: on a shared machine, compare runs taken alike.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_STEPS = 800      # about 4-5 s a run in-process on one core of the 2-core CI machine (idle)


def bench_suite(runs: int, slots: int, steps: int, threads: int, *, model: str = "conv4", size: int | None = None,
                batch: int = 32, devices: Any = "cpu", model_kwargs: dict | None = None) -> dict[str, Any]:
    """``runs`` equal runs (base, one seed each, final evaluation only) of ``model`` on ``synthetic`` data."""
    return {
        "name": "bench-makespan",
        "description": "mpbench bench makespan/packing: equal short runs on the pool launcher",
        "grid": {"regularizer": ["base"], "model": [model], "dataset": ["synthetic"], "seed": list(range(runs))},
        "data": {"image_size": size},
        "train": {"steps": steps, "batch_size": batch, "eval_every": 0, "eval_batch_size": 500,
                  "checkpoint_every": 0},
        "model_kwargs": {"width": 8} if model_kwargs is None else model_kwargs,
        "launcher": {"name": "pool", "devices": devices, "slots": slots, "threads": threads, "max_retries": 0},
        "wandb": {"mode": "disabled"},
    }


def time_suite(suite: dict[str, Any], per_job_process: bool = False, keep: Path | None = None) -> dict[str, Any]:
    """Run ``suite`` (a pool-launcher suite) as ``mpbench run`` drives it, in a fresh results dir; the makespan,
    each run's ``wall_time_s`` and start, the worker processes, and how many were forked."""
    from mpbench.fork import pin_driver

    pin_driver()                                  # as `mpbench run` does: its workers can be forked from it
    import yaml

    import mpbench.launchers.pool as pool
    from mpbench.config import load_suite
    from mpbench.launchers import Request, run_plan, warm_up
    from mpbench.plan import expand
    from mpbench.store import prepare_results_dir

    tmp = Path(tempfile.mkdtemp(prefix="mpbench-makespan-"))
    res_dir = Path(keep) if keep else tmp / "results"
    if keep and res_dir.exists():
        shutil.rmtree(res_dir)
    try:
        path = tmp / "bench-makespan.yaml"
        path.write_text(yaml.safe_dump(suite))
        cfg = load_suite(str(path), [])
        res = prepare_results_dir(res_dir)
        req = Request(expand(cfg), cfg, res, tmp / "data")
        old = pool.JOBS_PER_WORKER
        pool.JOBS_PER_WORKER = 1 if per_job_process else 0
        try:
            t0 = time.time()
            warm_up(req)
            outcomes = run_plan(req)
            makespan = time.time() - t0
            del req                                       # closes the pool's workers (not timed)
        finally:
            pool.JOBS_PER_WORKER = old
        logs = "".join(f.read_text() for f in (res / "pool").glob("slot*.log"))
        walls, starts, pids = [], [], set()
        for d in sorted((res / "runs").iterdir()):
            result = json.loads((d / "result.json").read_text()) if (d / "result.json").exists() else {}
            status = json.loads((d / "status.json").read_text())
            if result:
                walls.append(float(result["wall_time_s"]))
            starts.append(float(status.get("started") or t0) - t0)
            pids.add(status.get("pid"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"makespan_s": makespan, "walls": walls, "starts": starts, "pids": pids - {None},
            "done": sum(1 for v in outcomes.values() if v == "done"),
            "forked": logs.count("worker forked from the driver")}


def bench_makespan(runs: int = 16, slots: int = 2, steps: int | None = None, threads: int | None = None,
                   per_job_process: bool = False, verbose: bool = True, keep: Path | None = None) -> dict[str, Any]:
    """Run the suite once and return (and print) its makespan, the sum of wall times, the ideal and their ratio.

    ``threads`` per slot (default: cores / slots, at least 1); ``keep``: results dir to keep (default: a temporary
    one, removed afterwards)."""
    steps = int(steps or DEFAULT_STEPS)
    threads = int(threads or max(1, (os.cpu_count() or 1) // slots))
    load_before = os.getloadavg()
    t = time_suite(bench_suite(runs, slots, steps, threads), per_job_process, keep)
    load_after = os.getloadavg()
    walls, starts, makespan = t["walls"], t["starts"], t["makespan_s"]
    total = sum(walls)
    ideal = total / slots
    out = {
        "mode": "one process per job" if per_job_process else "persistent workers",
        "runs": runs, "slots": slots, "threads": threads, "steps": steps, "done": t["done"],
        "makespan_s": makespan, "sum_wall_s": total, "ideal_s": ideal,
        "ratio": makespan / ideal if ideal else float("nan"),
        "run_wall_s": {"mean": statistics.mean(walls) if walls else None, "min": min(walls, default=None),
                       "max": max(walls, default=None)},
        "first_start_s": min(starts) if starts else None,
        "ratio_after_startup": (makespan - min(starts)) / ideal if starts and ideal else float("nan"),
        "worker_processes": len(t["pids"]), "forked": t["forked"],
        "load_before": load_before, "load_after": load_after, "cores": os.cpu_count(),
    }
    if verbose:
        print(format_table(out))
    return out


def format_table(r: dict[str, Any]) -> str:
    w = r["run_wall_s"]

    def load(t: tuple[float, float, float]) -> str:
        return " ".join(f"{x:.2f}" for x in t)

    rows = [
        ("settings", f"{r['runs']} runs x {r['steps']} steps (base, conv4 width 8, synthetic, batch 32), "
                     f"pool launcher, {r['slots']} cpu slots x {r['threads']} thread(s)"),
        ("mode", f"{r['mode']} ({r['worker_processes']} worker processes, {r['forked']} forked from the driver)"),
        ("runs done", f"{r['done']}/{r['runs']}"),
        ("makespan", f"{r['makespan_s']:.1f} s"),
        ("sum of wall_time_s", f"{r['sum_wall_s']:.1f} s (per run mean {w['mean'] or 0:.2f} s, "
                               f"min {w['min'] or 0:.2f}, max {w['max'] or 0:.2f})"),
        ("ideal = sum / slots", f"{r['ideal_s']:.1f} s"),
        ("ratio", f"{r['ratio']:.3f}x"),
        ("first job started", f"{r['first_start_s']:.1f} s after launch (worker start-up)"
                              if r["first_start_s"] is not None else "-"),
        ("ratio after start-up", f"{r['ratio_after_startup']:.3f}x ((makespan - first start) / ideal)"),
        ("load average", f"{load(r['load_before'])} before, {load(r['load_after'])} after ({r['cores']} cores)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:>{width}}  {v}" for k, v in rows)
