"""The target run: one regularizer stack x architecture x dataset x seed, trained and evaluated."""
from __future__ import annotations

from typing import Any

from mpbench.jobs import JobKind, register_job_kind


@register_job_kind("run", "a target run: train one method on one architecture and dataset, then evaluate it")
class Run(JobKind):
    wandb = True

    @classmethod
    def slug(cls, spec: dict[str, Any]) -> str:
        return f"{'+'.join(spec['regularizer'])}-{spec['model']}-{spec['dataset']}-s{spec['seed']}"

    @classmethod
    def execute(cls, spec: dict[str, Any], rd: Any, ex: Any) -> dict[str, Any]:
        from mpbench.train import build, train_loop

        setup = build(spec, ex.data_root, ex.device, ex.artifacts)
        out = train_loop(setup, spec, ex.device, ex.hooks)
        return {**out, "regularizers": setup.stack.describe(), "eval_protocol": setup.stack.eval_protocol.describe(),
                "transferred_params": setup.stack.transferred()}
