"""``mpbench bench seedarray``: K seeds of one run trained as one vmapped array (mpbench/seed_array.py) vs the same
K runs one after another, each stepped by :class:`mpbench.train.Stepper` as ``train_loop`` steps it.

Every variant (the plain run and one array per K) takes its steps in turn, step after step, in one process
(``bench_loop.interleaved_medians``), so a busy machine slows them alike; medians of the measured steps are
reported. Speed-up = K x (plain ms/step) / (array ms/step): how many more runs per hour the array trains than K
runs in sequence on the same device. Runs/hour count training steps only (no evaluation, no start-up).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mpbench.bench_loop import interleaved_medians, probe_setup, sync_device, timed_step
from mpbench.bench_throughput import AUGMENT, bench_device, device_label
from mpbench.malloc import tune_for_training
from mpbench.seed_array import SeedArray
from mpbench.train import Stepper


def _array_step(arr: SeedArray, device: torch.device) -> Callable[[], None]:
    """A call that takes the array's next step, reads the K losses out (one host sync) and waits."""
    count = iter(range(10 ** 9))

    def step() -> None:
        losses, _, _ = arr.step(next(count))
        losses.tolist()
        sync_device(device)

    return step


def bench_seed_array(model: str = "resnet20", batch: int = 128, size: int = 32, seeds: Sequence[int] = (1, 2, 4, 8),
                     steps: int = 10, device: str = "cpu", threads: int = 2, warmup: int = 2,
                     run_steps: int = 10000) -> dict[str, Any]:
    """Median ms per step of one plain run and of a K-seed array for each K in ``seeds`` (method ``base``, Adam);
    returns ``{"header": [lines], "rows": [{k, variant, ms, cpu_ms, ms_per_run, sequential_ms, speedup,
    runs_per_hour}]}``."""
    torch.set_num_threads(threads)
    tune_for_training()                                  # as every training run does (mpbench.malloc)
    dev = bench_device(device)
    total = warmup + steps

    def setup(seed: int, tmp: Path) -> tuple[Any, dict[str, Any]]:
        s, spec = probe_setup(["base"], model, batch, size, total, dev, tmp)
        spec = {**spec, "seed": seed, "train": {**spec["train"], "augment": dict(AUGMENT)}}
        s.model.train()
        return s, spec

    with tempfile.TemporaryDirectory() as tmp:
        fns = {"plain": timed_step(Stepper(*setup(0, Path(tmp)), dev), dev)}
        for k in seeds:
            pairs = [setup(i, Path(tmp)) for i in range(k)]
            fns[f"array{k}"] = _array_step(SeedArray([p[0] for p in pairs], [p[1] for p in pairs], dev), dev)
        med, cpu = interleaved_medians(fns, warmup, steps)
    plain = med["plain"]
    rows = [{"k": 1, "variant": "plain run (Stepper)", "ms": 1000 * plain, "cpu_ms": 1000 * cpu["plain"],
             "ms_per_run": 1000 * plain, "sequential_ms": 1000 * plain, "speedup": 1.0,
             "runs_per_hour": 3600 / (plain * run_steps)}]
    for k in seeds:
        t = med[f"array{k}"]
        rows.append({"k": k, "variant": f"array of {k}", "ms": 1000 * t, "cpu_ms": 1000 * cpu[f"array{k}"],
                     "ms_per_run": 1000 * t / k, "sequential_ms": 1000 * k * plain, "speedup": k * plain / t,
                     "runs_per_hour": k * 3600 / (t * run_steps)})
    header = [f"mpbench bench seedarray: {model}, method base, batch {batch} per seed, {size} px, Adam (lr 1e-3, "
              f"wd 5e-4), augmentation crop 4 + flip, {device_label(dev)}, torch {torch.__version__}",
              f"median of {steps} measured steps per variant after {warmup} warm-up steps, variants interleaved "
              f"step by step in one process; ms/step includes the loss read-out (one host sync per step); "
              f"speed-up = K x plain ms/step / array ms/step; runs/hour: training steps only, {run_steps} steps a run; "
              f"cpu ms/step: this process's CPU time per step (all its threads)"]
    return {"header": header, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    lines = [*result["header"], "",
             f"{'variant':<20}  {'K':>3}  {'ms/step':>9}  {'ms/run-step':>11}  {'K plain ms':>10}  {'speed-up':>8}  "
             f"{'runs/hour':>9}  {'cpu ms/step':>11}",
             f"{'-' * 20}  {'-' * 3}  {'-' * 9}  {'-' * 11}  {'-' * 10}  {'-' * 8}  {'-' * 9}  {'-' * 11}"]
    for r in result["rows"]:
        lines.append(f"{r['variant']:<20}  {r['k']:>3}  {r['ms']:>9.2f}  {r['ms_per_run']:>11.2f}  "
                     f"{r['sequential_ms']:>10.2f}  {r['speedup']:>7.2f}x  {r['runs_per_hour']:>9.2f}  "
                     f"{r['cpu_ms']:>11.2f}")
    return "\n".join(lines)
