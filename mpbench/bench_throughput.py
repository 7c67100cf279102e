"""``mpbench bench throughput``: ms/step and images/s of the training step under each execution option
(mpbench/execution.py) and a few combinations, against eager, on one model and method.

Every variant is its own copy of the same run (same seed, model, batch, augmentation) stepped through
:class:`mpbench.train.Stepper` exactly as ``train_loop`` steps it (including the per-step loss read-out); the
variants take their steps in turn, step after step, in one process (``bench_loop.interleaved_medians``), so a busy
machine slows them alike; the medians of the measured steps are reported. A variant whose options cannot run on
the device (or for the method) is listed as ``n/a (reason)``, not timed.
"""
from __future__ import annotations

import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from mpbench.bench_loop import interleaved_medians, probe_setup, timed_step
from mpbench.errors import UsageError
from mpbench.execution import GRAPH_WARMUP
from mpbench.malloc import tune_for_training

CL, FUSED, BF16 = {"channels_last": True}, {"fused_adam": True}, {"autocast": "bf16"}
VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {},
    "channels_last": CL,
    "cudnn_benchmark": {"cudnn_benchmark": True},
    "fused_adam": FUSED,
    "autocast=bf16": BF16,
    "compile": {"compile": True},
    "cuda_graph": {"cuda_graph": True},
    "channels_last+fused_adam": {**CL, **FUSED},
    "channels_last+fused_adam+bf16": {**CL, **FUSED, **BF16},
    "channels_last+fused_adam+compile": {**CL, **FUSED, "compile": True},
    "channels_last+cudnn+fused_adam+cuda_graph": {**CL, **FUSED, "cudnn_benchmark": True, "cuda_graph": True},
    "channels_last+cudnn+fused_adam+bf16+cuda_graph": {**CL, **FUSED, **BF16, "cudnn_benchmark": True,
                                                        "cuda_graph": True},
}
AUGMENT = {"crop_pad": 4, "flip": True}      # the suites' default augmentation: part of the step being timed


def pick_variants(names: tuple[str, ...] | list[str]) -> dict[str, dict[str, Any]] | None:
    """``VARIANTS`` restricted to ``names`` (plus eager, the reference); None (all) when none is named."""
    if not names:
        return None
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        from mpbench.errors import did_you_mean

        raise UsageError(f"unknown throughput variant {unknown[0]!r}: {did_you_mean(unknown[0], list(VARIANTS))}")
    return {n: VARIANTS[n] for n in VARIANTS if n == "eager" or n in names}


def bench_device(device: str) -> torch.device:
    """``--device`` of a step-time benchmark as a torch device (a usage error when it is not here)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible here (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: use cpu or cuda")
    return dev


def device_label(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bench_throughput(model: str = "resnet20", method: str = "base", batch: int = 128, size: int = 32,
                     threads: int = 2, steps: int = 20, device: str = "cpu", warmup: int | None = None,
                     variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Median ms/step and images/s of each variant (``VARIANTS``: name -> execution options); returns
    ``{"header": [lines], "rows": [{variant, options, ms, images_per_s, ratio, note}]}``."""
    from mpbench.train import Stepper

    torch.set_num_threads(threads)
    tune_for_training()                                  # as every training run does (mpbench.malloc)
    dev = bench_device(device)
    variants = variants or VARIANTS
    warmup = max(3, GRAPH_WARMUP + 2) if warmup is None else warmup    # a graph replays from step GRAPH_WARMUP + 1
    fns, steppers, rows = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, opts in variants.items():
            setup, spec = probe_setup([method], model, batch, size, warmup + steps, dev, Path(tmp))
            spec["train"]["augment"] = dict(AUGMENT)
            setup.model.train()
            st = Stepper(setup, spec, dev, opts)
            rows[name] = {"variant": name, "options": dict(opts), "ms": None, "cpu_ms": None, "images_per_s": None,
                          "ratio": None, "note": ""}
            if st.execution.fallbacks:
                rows[name]["note"] = "n/a (" + "; ".join(f"{k}: {v}" for k, v in st.execution.fallbacks.items()) + ")"
                continue
            steppers[name] = st
            fns[name] = timed_step(st, dev)
        med, cpu = interleaved_medians(fns, warmup, steps)
    base = med.get("eager")
    for name, st in steppers.items():
        row = rows[name]
        late = {k: v for k, v in st.execution.fallbacks.items()}
        if late:                                         # fell back while running (compile or capture failed)
            row["note"] = "n/a (" + "; ".join(f"{k}: {v}" for k, v in late.items()) + ")"
            continue
        row["ms"] = 1000 * med[name]
        row["cpu_ms"] = 1000 * cpu[name]                   # this process's CPU time: less sensitive to other load
        row["images_per_s"] = batch / med[name]
        row["ratio"] = base / med[name] if base else None          # speed-up over eager (> 1: faster)
        notes = st.execution.notes
        if "fused_adam" in notes:
            row["note"] = notes["fused_adam"]
    header = [f"mpbench bench throughput: {model}, method {method}, batch {batch}, {size} px, Adam (lr 1e-3, "
              f"wd 5e-4), augmentation crop 4 + flip, {device_label(dev)}, torch {torch.__version__}",
              f"median of {steps} measured steps per variant after {warmup} warm-up steps, variants interleaved "
              f"step by step in one process; ms/step includes the loss read-out (one host sync per step, as "
              f"train_loop); cpu ms/step: this process's CPU time per step (all its threads)"]
    return {"header": header, "rows": list(rows.values())}


def format_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    width = max(len(r["variant"]) for r in rows)
    lines = [*result["header"], "",
             f"{'variant':<{width}}  {'ms/step':>9}  {'images/s':>9}  {'speed-up':>8}  {'cpu ms/step':>11}  note",
             f"{'-' * width}  {'-' * 9}  {'-' * 9}  {'-' * 8}  {'-' * 11}  ----"]
    for r in rows:
        if r["ms"] is None:
            lines.append(f"{r['variant']:<{width}}  {'n/a':>9}  {'n/a':>9}  {'':>8}  {'':>11}  {r['note']}")
            continue
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else ""
        lines.append(f"{r['variant']:<{width}}  {r['ms']:>9.2f}  {r['images_per_s']:>9.1f}  {ratio:>8}  "
                     f"{r['cpu_ms']:>11.2f}  {r['note']}")
    return "\n".join(lines)
