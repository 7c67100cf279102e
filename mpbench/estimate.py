"""What a plan costs: device-hours of every job, from a short measured probe of each distinct (model, image size,
methods, batch) on the device the launcher would use, cached in ``<cache>/probes.json``.

A job's estimate is its training steps x the probed step time, plus its evaluations at a third of a step per
forward batch (a forward is about a third of a forward+backward+update), plus for ``metatrain`` each meta-step's
inner and outer step of every task. Labelled an estimate wherever it is shown.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mpbench.config import cache_dir
from mpbench.plan import Job, Plan
from mpbench.store import write_json

FORWARD_SHARE = 1 / 3


@dataclass(frozen=True)
class Probe:
    """One distinct step to time."""

    model: str
    image_size: int
    methods: tuple[str, ...]
    batch: int

    def key(self, device: str) -> str:
        return f"{device}|torch {torch.__version__}|{self.model}|{self.image_size}px|{'+'.join(self.methods)}|b{self.batch}"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu x{torch.get_num_threads()}"


def _probes(job: Job) -> list[tuple[Probe, float]]:
    """(probe, how many of its steps the job takes, evaluations included)."""
    s = job.spec
    if job.kind == "metatrain":
        size = s["data"].get("image_size") or 32
        tasks = 2 * int(s["groups"]) if s["split"] == "release" else int(s["groups"])
        select = int(s.get("select_steps") or min(int(s["steps"]), 200)) if int(s["runs"]) > 1 else 0
        steps = int(s["runs"]) * (int(s["steps"]) * 2 * tasks * int(s.get("inner_steps", 1)) + select)
        return [(Probe(s["model"], size, ("metaperturb",), int(s["batch_size"])), steps)]
    from mpbench.data import DATASETS

    t, size = s["train"], s["data"].get("image_size") or 32
    test = DATASETS.get(s["dataset"]).sizes.get("test", 10_000)
    mp = s.get("reg", {}).get("metaperturb", {})            # the one method evaluated with MC passes by default
    periodic = int(t.get("eval_passes") or mp.get("eval_passes", 1))
    final = int(t.get("final_eval_passes") or mp.get("final_eval_passes", 1))
    evals = (int(t["steps"]) // int(t["eval_every"]) if t.get("eval_every") else 0) * periodic + final
    forward = evals * test / int(t["batch_size"]) * FORWARD_SHARE   # in training steps
    return [(Probe(s["model"], size, tuple(s["regularizer"]), int(t["batch_size"])), int(t["steps"]) + forward)]


def measure(probe: Probe, device: torch.device, steps: int = 5, warmup: int = 2) -> float:
    """Median seconds per training step of ``probe`` on ``device`` (random data, the run loop's own step)."""
    import statistics

    from mpbench.bench_loop import probe_setup, probe_step, sync_device

    with tempfile.TemporaryDirectory() as tmp:
        setup, spec = probe_setup(list(probe.methods), probe.model, probe.batch, probe.image_size, warmup + steps,
                                  device, Path(tmp), n=max(2 * probe.batch, 256))
        step = probe_step(setup, spec, device)
        times = []
        for i in range(warmup + steps):
            tic = time.perf_counter()
            step()
            sync_device(device)
            if i >= warmup:
                times.append(time.perf_counter() - tic)
    return statistics.median(times)


def estimate(plan: Plan, device: torch.device, on_probe: Callable[[Probe, int, int], None] | None = None,
             cache: Path | None = None) -> dict[str, Any]:
    """Seconds per job and in total on ``device`` (probes measured once and cached)."""
    path = cache or cache_dir() / "probes.json"
    try:
        known: dict[str, float] = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    label = device_label(device)
    per_job = {job.id: _probes(job) for job in plan.jobs}
    distinct = list(dict.fromkeys(p for probes in per_job.values() for p, _ in probes))
    todo = [p for p in distinct if p.key(label) not in known]
    for i, probe in enumerate(todo):
        if on_probe:
            on_probe(probe, i + 1, len(todo))
        known[probe.key(label)] = measure(probe, device)
    if todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, known)
    seconds = {jid: sum(known[p.key(label)] * n for p, n in probes) for jid, probes in per_job.items()}
    return {"device": label, "seconds": seconds, "total_s": sum(seconds.values()),
            "stages_s": sum(seconds[j.id] for j in plan.artifacts), "probes": len(distinct), "measured": len(todo)}
