"""The meta-step loop shared by every execution mode and rank, with its stop and checkpoint decisions.

Rank 0 holds the ``RunHooks``: it decides when everybody stops and gathers the full trainer state (every task's
theta_k, streams and generators, phi and phi's optimizer) for a checkpoint every ``checkpoint_every`` meta-steps
and when asked to stop (then :class:`mpbench.train.Interrupted` is raised). The gathered state has the same form
in every mode, so a checkpoint written in one mode resumes in the other (``shared/design/metaperturb.md`` §2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mpbench.errors import RunFailed
from mpbench.metatrain.trainer import MetaTrainer
from mpbench.train import Interrupted, RunHooks


@dataclass
class Control:
    """Collective control of a run: rank 0 decides, everybody follows (identity functions in one process)."""

    world: int = 1
    group: Any = None

    def decide(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.broadcast(t, src=0, group=self.group)
        return bool(t.item())

    def gather(self, trainer: MetaTrainer) -> dict[str, Any] | None:
        """The full trainer state (tasks as a list in task order) on rank 0; None on the others."""
        local = trainer.local_state()
        if self.world == 1:
            parts = [local]
        else:
            import torch.distributed as dist

            parts = [None] * self.world if trainer.rank == 0 else None
            dist.gather_object(local, parts, dst=0, group=self.group)
            if trainer.rank != 0:
                return None
        tasks: dict[int, Any] = {}
        for part in parts:
            tasks.update(part["tasks"])
        return {**local, "tasks": [tasks[k] for k in range(len(trainer.tasks))]}


def run_steps(trainer: MetaTrainer, steps: int, ctl: Control, checkpoint_every: int,
              hooks: RunHooks | None = None, save: Callable[[dict[str, Any]], None] | None = None,
              progress: Callable[[int, float, float], None] | None = None) -> None:
    """Meta-train to ``steps``. Rank 0 holds the hooks; the stop decision and checkpoints are collective."""
    for step in range(trainer.step, steps):
        stop = ctl.decide(bool(hooks and hooks.should_stop()))
        if stop:
            state = ctl.gather(trainer)
            if state is not None:
                if save:
                    save(state)
                raise Interrupted(f"stopped at meta-step {step}")
            return
        train_loss, valid_loss = trainer.meta_step()
        if not (math.isfinite(train_loss) and math.isfinite(valid_loss)):
            raise RunFailed(f"non-finite meta-training loss (train {train_loss}, valid {valid_loss}) at meta-step "
                            f"{step}: lower stages.metatrain.lr")
        if progress:
            progress(trainer.step, train_loss, valid_loss)
        if checkpoint_every and trainer.step % checkpoint_every == 0 and trainer.step < steps:
            state = ctl.gather(trainer)
            if state is not None and save:
                save(state)
