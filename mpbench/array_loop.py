"""The training loop of a seed array (mpbench/seed_array.py): ``train.train_loop`` for K member runs at once.

Each member keeps what its lone run would have: its hooks (progress, metrics rows, checkpoints, the stop flag),
its TrainLog rows, periodic and final evaluations (``train.evaluate`` on its own model, synced from the array) and
checkpoints in the Stepper's layout (``SeedArray.state_dict(k)``), so it can resume alone as well as in an array.
Timing is the array's: each member's ``train_time_s`` is the array's training time, its ``images_per_s`` counts
its own images.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from mpbench.seed_array import SeedArray
from mpbench.train import (Interrupted, RunHooks, Setup, TrainLog, evaluate, loop_state, resume_counters,
                           set_rng_state)


class MemberLoop:
    """One member's side of the loop: its setup, hooks, rows and counters (resumed from ``hooks``' checkpoint)."""

    def __init__(self, s: Setup, spec: dict[str, Any], hooks: RunHooks):
        t = spec["train"]
        self.s, self.spec, self.hooks = s, spec, hooks
        self.log = TrainLog(int(t.get("log_every") or 0), t["steps"])
        self.start, self.history, self.train_time, self.images = 0, [], 0.0, 0
        self.state = hooks.load_checkpoint()
        if self.state is not None:
            self.start, self.history, self.train_time, self.images = resume_counters(self.state, self.log)

    @property
    def last_loss(self) -> float:
        return next((r["loss"] for r in reversed(self.history) if r.get("split") == "train"), float("nan"))

    def emit(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.hooks.on_row:
            self.hooks.on_row(row)

    def checkpoint(self, arr: SeedArray, k: int, step: int) -> None:
        if self.hooks.save_checkpoint is not None:
            self.hooks.save_checkpoint(loop_state(arr.state_dict(k), step, self.history, self.train_time,
                                                  self.images, self.log))

    def add(self, done: int, steps: int, total: torch.Tensor, ce: torch.Tensor, batch: int, took: float,
            lr: float, value: float) -> None:
        """One step's bookkeeping; ``value``: ``total`` read back already (one read for all members)."""
        self.train_time, self.images = self.train_time + took, self.images + batch
        self.log.add(total, {"cross_entropy": ce}, batch, took)
        if self.hooks.on_step is not None:
            self.hooks.on_step(done, steps, value)
        if done % self.log.every == 0 or done == steps:
            self.emit(self.log.row(done, lr, self.s.stack.scalars()))

    def result(self, final: dict[str, Any]) -> dict[str, Any]:
        self.emit({"split": "eval", "final": True, "step": self.spec["train"]["steps"], "loss": self.last_loss,
                   **final})
        return {"final": dict(final), "history": self.history, "train_time_s": self.train_time,
                "images_per_s": self.images / self.train_time if self.train_time else float("nan")}


def _resume(arr: SeedArray, members: list[MemberLoop]) -> int:
    """The step the array starts at: 0, or the members' common checkpoint step (their states loaded)."""
    states = [m.state for m in members]
    if all(st is None for st in states):
        return 0
    if any(st is None for st in states) or len({m.start for m in members}) != 1:
        raise RuntimeError("a seed array resumes only members checkpointed at one step (jobs/array.py checks it)")
    arr.load_state_dicts(states)
    set_rng_state(states[0]["rng"])
    return members[0].start


def train_array(arr: SeedArray, members: list[MemberLoop], device: torch.device,
                on_step: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Train every member for ``train.steps`` in lockstep; returns each member's ``train_loop`` output (without
    ``execution``). A stop checkpoints every member and raises Interrupted; a non-finite loss raises RunFailed
    (its ``seeds``: which)."""
    t = arr.specs[0]["train"]
    steps = t["steps"]
    for step in range(_resume(arr, members), steps):
        if any(m.hooks.should_stop() for m in members):
            for k, m in enumerate(members):
                m.checkpoint(arr, k, step)
            raise Interrupted(f"stopped at step {step}")
        tic = time.perf_counter()
        losses, batch, terms = arr.step(step)
        if device.type == "cuda" and step % 50 == 0:
            torch.cuda.synchronize()
        took, done, lr = time.perf_counter() - tic, step + 1, float(arr.sched.get_last_lr()[0])
        values = losses.tolist()                   # one host sync for the K progress values, not K
        for k, m in enumerate(members):
            m.add(done, steps, losses[k], terms["cross_entropy"][k], batch, took, lr, values[k])
        if t["eval_every"] and done % t["eval_every"] == 0 and done < steps:
            arr.sync_models()
            for m in members:
                m.emit({"split": "eval", "step": done, **evaluate(m.s, t, final=False, device=device)})
        every = members[0].hooks.checkpoint_every
        if every and done % every == 0 and done < steps:
            for k, m in enumerate(members):
                m.checkpoint(arr, k, done)
        if on_step is not None:
            on_step(done, steps)
    arr.sync_models()
    return [m.result(evaluate(m.s, t, final=True, device=device)) for m in members]

