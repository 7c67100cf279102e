"""MetaPerturb's meta-training stage (``metatrain``): learn the perturbation function phi on source tasks.

Implements ``shared/design/metaperturb.md`` section 2 (Ryu, Shin, Lee, Hwang, NeurIPS 2020, arXiv 2006.07540).
One concept per module: :mod:`.tasks` (source tasks, held-out data), :mod:`.learner` (theta_k with the shared
phi), :mod:`.trainer` (the first-order meta step), :mod:`.loop` (the step loop, stop and checkpoints),
:mod:`.distributed` (ranks and all-reduce), :mod:`.selection` (best of runs), :mod:`.record` (provenance).

The stage spec is ``MetatrainStage`` (mpbench/jobs/metatrain.py, the stage's job kind) without ``file``: ``select_steps`` null means
``min(steps, 200)``, ``model_kwargs`` go to ``timm.create_model``, and the runner passes ``checkpoint_every`` as
``RunHooks.checkpoint_every``. Output: ``phi.pt``, phi's state dict only (82 floats under the released names).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpbench.errors import RunFailed, UsageError
from mpbench.metatrain.distributed import WORLD_ENV, backend_for, train_distributed, world_size_from_env
from mpbench.metatrain.loop import Control, run_steps
from mpbench.metatrain.record import artifact_record
from mpbench.metatrain.selection import choose, selection_score
from mpbench.metatrain.tasks import Task, halves, make_tasks, selection_data, source_tasks
from mpbench.metatrain.trainer import MetaTrainer
from mpbench.train import RunHooks

__all__ = ["MetaTrainer", "Task", "choose", "halves", "make_tasks", "metatrain",
           "selection_data"]

CHECKPOINT_VERSION = 1


def _check(spec: dict[str, Any], tasks: list[Task]) -> None:
    for k in ("steps", "inner_steps", "runs", "batch_size"):
        if int(spec[k]) < 1:
            raise UsageError(f"stages.metatrain.{k}={spec[k]} must be >= 1")
    bs = int(spec["batch_size"])
    if bs < 2:
        raise UsageError(f"stages.metatrain.batch_size={bs} must be >= 2 (the perturbation uses batch variances)")
    smallest = min(min(len(t.train), len(t.valid)) for t in tasks)
    if bs > smallest:
        raise UsageError(f"stages.metatrain.batch_size={bs} is larger than the smallest source task split "
                         f"({smallest} images with split={spec['split']}, groups={spec['groups']}): lower "
                         f"stages.metatrain.batch_size or groups")


def metatrain(spec: dict[str, Any], data_root: Path, device: torch.device, hooks: RunHooks | None = None,
              world_size: int | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Meta-train phi ``runs`` times (seeds ``seed ..``), keep the best; returns (provenance, phi state dict).

    ``world_size`` None = env ``MPBENCH_METATRAIN_WORLD`` (default 1 = one process); resumes from
    ``hooks.load_checkpoint()`` in either mode."""
    hooks = hooks or RunHooks()
    started = time.time()
    world = int(world_size) if world_size is not None else world_size_from_env()
    if world < 1:
        raise UsageError(f"world_size={world} must be >= 1")
    tasks, test = source_tasks(spec, data_root)
    _check(spec, tasks)
    if world > len(tasks):
        raise UsageError(f"{WORLD_ENV}={world} exceeds the {len(tasks)} source tasks: use at most {len(tasks)}")
    steps, runs = int(spec["steps"]), int(spec["runs"])
    checkpoint_every = int(hooks.checkpoint_every or 0)
    sel = selection_data(test, spec, data_root) if runs > 1 else None
    select_steps = int(spec["select_steps"] or min(steps, 200)) if sel is not None else None
    if sel is not None and (min(len(sel[0]), len(sel[1])) < 2):
        where = (spec.get("selection") or {}).get("dataset") or f"{spec['dataset']} (its test split)"
        raise UsageError(f"stages.metatrain.runs={runs}: the held-out selection on {where} has fewer than 2 images "
                         f"per half: give stages.metatrain.selection more images, or runs=1")

    state = hooks.load_checkpoint()
    if state is not None and state.get("kind") != "metatrain":
        raise RunFailed("checkpoint.pt is not a metatrain checkpoint: delete it to restart")
    done: list[dict[str, Any]] = list(state["done"]) if state else []
    history: list[dict[str, Any]] = list(state["history"]) if state else []
    train_time = float(state["train_time"]) if state else 0.0
    resume = state["trainer"] if state else None
    info: dict[str, Any] = {}

    for r in range(len(done), runs):
        run_seed = int(spec["seed"]) + r
        tic = time.perf_counter()
        last: list[float] = []

        def save(tstate: dict[str, Any], r: int = r, tic: float = tic) -> None:
            if hooks.save_checkpoint is not None:
                hooks.save_checkpoint({"kind": "metatrain", "version": CHECKPOINT_VERSION, "run": r, "done": done,
                                       "trainer": tstate, "history": history, "step": r * steps + int(tstate["step"]),
                                       "train_time": train_time + time.perf_counter() - tic})

        log_every = max(1, steps // 50)

        def progress(step: int, train_loss: float, valid_loss: float, r: int = r, tic: float = tic) -> None:
            last.append(valid_loss)
            del last[:-max(1, min(10, steps))]
            if hooks.on_step:
                hooks.on_step(r * steps + step, runs * steps, valid_loss)
            if step % log_every == 0 or step == steps:
                row = {"split": "train", "step": r * steps + step, "run": r, "meta_step": step, "loss": valid_loss,
                       "train_loss": train_loss, "time_s": train_time + time.perf_counter() - tic}
                history.append(row)
                if hooks.on_row:
                    hooks.on_row(row)

        if world == 1:
            trainer = MetaTrainer(spec, tasks, run_seed, device, state=resume)
            run_steps(trainer, steps, Control(), checkpoint_every, hooks, save, progress)
        else:
            trainer = train_distributed(spec, data_root, tasks, run_seed, device, world, checkpoint_every, hooks,
                                        save, progress, resume)
        resume = None
        train_time += time.perf_counter() - tic
        if not info:
            lr0 = next(iter(trainer.learners.values()))
            info = {"sites": lr0.sites, "channel_norm": lr0.channel_norm, "spatial_norm": lr0.spatial_norm,
                    "backend": backend_for(device, world) if world > 1 else None}
        phi = trainer.phi_state()
        score = selection_score(spec, phi, sel, device, select_steps) if sel is not None else None
        done.append({"run": r, "seed": run_seed, "phi": phi, "score": score,
                     "final_valid_loss": float(np.mean(last)) if last else float("nan"),
                     "train_time_s": time.perf_counter() - tic})

    best = choose([d["score"] for d in done])
    out = artifact_record(spec, tasks, done, best, info, sel, select_steps, world, history, train_time, started)
    return out, done[best]["phi"]
