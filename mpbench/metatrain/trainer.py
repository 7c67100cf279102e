"""One meta-training run of MetaPerturb's phi, or one rank's share of it (``shared/design/metaperturb.md`` §2).

Each meta step, per task: ``inner_steps`` steps of theta_k (phi frozen), then the first-order gradient of the
valid cross-entropy with respect to phi (no unrolled inner step). phi's gradients are **averaged over tasks**
(summed in task order, the same in every execution mode), clipped at ``clip``, and phi takes one step of its own
Adam (``lr``, ``weight_decay``); no schedule, noise coefficient 1.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from mpbench.metatrain.learner import INIT, Learner, derive_seed, new_phi, stream_seeds
from mpbench.metatrain.tasks import Task


class MetaTrainer:
    """One meta-training run, or this rank's share of it: phi, phi's optimizer and the learners of owned tasks.

    ``comm`` sums the (tasks x 84) gradient matrix over ranks (set when ``world > 1``); ``state``: a full trainer
    state to resume from (:meth:`load_state_dict`)."""

    def __init__(self, spec: dict[str, Any], tasks: list[Task], run_seed: int, device: torch.device,
                 rank: int = 0, world: int = 1, comm: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 state: dict[str, Any] | None = None):
        self.spec, self.tasks, self.run_seed, self.device = spec, tasks, int(run_seed), device
        self.rank, self.world, self.comm = rank, world, comm
        self.phi = new_phi(derive_seed(run_seed, -1, INIT), device)
        self.owned = [t.index for t in tasks if t.index % world == rank]
        self.learners = {k: Learner(spec, tasks[k].train, tasks[k].valid, len(tasks[k].classes), self.phi,
                                    stream_seeds(run_seed, k), device)
                         for k in self.owned}
        self.opt = torch.optim.Adam(self.phi.parameters(), lr=float(spec["lr"]),
                                    weight_decay=float(spec["weight_decay"]))
        self.numel = sum(p.numel() for p in self.phi.parameters())
        self.step = 0
        if state is not None:
            self.load_state_dict(state)

    def task_grads(self) -> torch.Tensor:
        """(tasks, 82 + 2) float32 CPU matrix: each owned task's phi gradient, train loss and valid loss; zeros in
        the rows of tasks owned by other ranks."""
        inner = int(self.spec["inner_steps"])
        rows = torch.zeros(len(self.tasks), self.numel + 2, dtype=torch.float32)
        for k in self.owned:
            learner = self.learners[k]
            train_loss = learner.inner(inner)
            grads, valid_loss = learner.phi_grad()
            rows[k, :self.numel] = torch.cat([g.reshape(-1) for g in grads]).float().cpu()
            rows[k, self.numel] = train_loss
            rows[k, self.numel + 1] = valid_loss
        return rows

    def meta_step(self) -> tuple[float, float]:
        """One step of phi; returns the task-averaged (train loss, valid loss)."""
        rows = self.task_grads()
        if self.world > 1:
            rows = self.comm(rows)             # sum over ranks: every row has exactly one non-zero contributor
        total = rows[0].clone()
        for k in range(1, len(self.tasks)):    # task order, identical in every execution mode
            total += rows[k]
        mean = total / len(self.tasks)
        off = 0
        for p in self.phi.parameters():
            p.grad = mean[off:off + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype).clone()
            off += p.numel()
        torch.nn.utils.clip_grad_norm_(self.phi.parameters(), float(self.spec["clip"]))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return float(mean[self.numel]), float(mean[self.numel + 1])

    def phi_state(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.phi.phi_state_dict().items()}

    def local_state(self) -> dict[str, Any]:
        return {"phi": self.phi_state(), "phi_opt": _to_cpu(self.opt.state_dict()), "step": self.step,
                "tasks": {k: _to_cpu(self.learners[k].state_dict()) for k in self.owned}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a full trainer state (``tasks``: a list in task order); only owned tasks are used."""
        for k in self.owned:
            self.learners[k].load_state_dict(state["tasks"][k])
        self.phi.load_phi(state["phi"], source="metatrain checkpoint")
        self.opt.load_state_dict(state["phi_opt"])
        self.step = int(state["step"])


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
