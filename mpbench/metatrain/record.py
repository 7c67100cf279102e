"""What a ``metatrain`` artifact records (artifact.json / result.json; ``shared/design/metaperturb.md`` §2).

The source, split scheme and tasks, architecture and sites, hyperparameters, seeds, every run's selection score,
the chosen run, execution mode and world size, and the meta-training history.
"""
from __future__ import annotations

import time
from typing import Any

from mpbench.data.base import ImageData
from mpbench.metatrain.tasks import Task, split_rule


def _selection_text(spec: dict[str, Any]) -> str:
    chosen = spec.get("selection") or {}
    if not chosen.get("dataset"):
        return f"{spec['dataset']} test split (not used by meta-training), all source classes"
    take = f"up to {chosen['per_class']}" if chosen.get("per_class") is not None else "all"
    return (f"{chosen['dataset']} training images after the first {chosen.get('skip_per_class') or 0} of each class "
            f"({take} per class; disjoint from data.per_class <= {chosen.get('skip_per_class') or 0} subsets)")


def artifact_record(spec: dict[str, Any], tasks: list[Task], done: list[dict[str, Any]], best: int,
                    info: dict[str, Any], sel: tuple[ImageData, ImageData] | None, select_steps: int | None,
                    world: int, history: list[dict[str, Any]], train_time: float, started: float) -> dict[str, Any]:
    """The artifact's provenance; ``done``: the finished runs (``best`` the chosen one), ``info``: the sites,
    norms and backend of the first run, ``started``: the stage's ``time.time()`` at start."""
    phi = done[best]["phi"]
    return {
        "payload": "phi.pt",
        "method": "metaperturb",
        "source": {"dataset": spec["dataset"], "data": dict(spec["data"]), "split": spec["split"],
                   "split_rule": split_rule(spec["split"]), "groups": int(spec["groups"]), "num_tasks": len(tasks),
                   "tasks": [t.describe() for t in tasks]},
        "architecture": spec["model"], "sites": info.get("sites"), "channel_norm": info.get("channel_norm"),
        "spatial_norm": info.get("spatial_norm"),
        "meta": {"steps": int(spec["steps"]), "inner_steps": int(spec["inner_steps"]),
                 "batch_size": int(spec["batch_size"]), "lr": float(spec["lr"]),
                 "weight_decay": float(spec["weight_decay"]), "clip": float(spec["clip"]),
                 "first_order": True, "phi_grad": "mean over tasks", "noise_coeff": 1.0,
                 "augment": dict(spec["augment"])},
        "seeds": [int(spec["seed"]) + r for r in range(int(spec["runs"]))],
        "runs": [{k: v for k, v in d.items() if k != "phi"} for d in done],
        "chosen_run": best,
        "selection": ({"data": _selection_text(spec) + ", halved per class: first half trains a fresh network "
                               "with phi frozen, second half scores it (deterministic)",
                       "rule": dict(spec.get("selection") or {}),
                       "steps": select_steps, "metric": "acc (ties: nll)",
                       "train": len(sel[0]), "valid": len(sel[1])} if sel is not None else
                      {"data": None, "note": "runs=1: nothing to choose"}),
        "execution": {"mode": "distributed" if world > 1 else "single-process", "world_size": world,
                      "backend": info.get("backend")},
        "phi_numel": int(sum(v.numel() for v in phi.values())),
        "train_time_s": train_time,
        "meta_wall_time_s": time.time() - started,
        "final": {"valid_loss": done[best]["final_valid_loss"],
                  **({f"select_{k}": v for k, v in done[best]["score"].items()} if done[best]["score"] else {})},
        "history": history,
    }
