"""Stage builders: a stage turns an artifact spec into an artifact directory that target runs use.

``pretrain`` trains the target architecture on a source dataset and saves ``model.pt``; ``metatrain`` is
registered by MetaPerturb's meta-training module. Each builder has the signature
``build(spec, run_dir, ex) -> result dict`` (``ex``: the ``runner.Execution`` of this job).
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable

import torch

from mpbench.registry import Registry
from mpbench.store import atomic_write


def _load_builders() -> None:
    if importlib.util.find_spec("mpbench.metatrain") is not None:
        importlib.import_module("mpbench.metatrain")


STAGES: Registry[Callable[..., dict[str, Any]]] = Registry("stage", loader=_load_builders)


def register_stage(kind: str, description: str = "") -> Callable:
    return STAGES.register(kind, description=description)


def save_tensors(path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temp file and rename: a reader never sees a half-written file."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


@register_stage("pretrain", "supervised training on a source dataset; output: model.pt (same architecture)")
def build_pretrain(spec: dict[str, Any], rd, ex) -> dict[str, Any]:
    from mpbench.train import build, train_loop

    setup = build(spec, ex.data_root, ex.device, {})
    out = train_loop(setup, spec, ex.device, ex.hooks)
    save_tensors(rd.path / "model.pt", {k: v.cpu() for k, v in setup.model.state_dict().items()})
    return {**out, "num_classes": setup.num_classes, "payload": "model.pt"}
