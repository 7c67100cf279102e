"""Best of ``runs``: score each meta-trained phi on held-out data and keep the best (``metaperturb.md`` §2).

The paper picks the best of 5 runs on held-out CIFAR-100 data. Here a fresh network trains ``select_steps``
steps with phi frozen on the first half (per class) of the source *test* split, which meta-training never sees,
and is scored deterministically (expected multiplier, running statistics) on the second half: highest accuracy
wins, ties go to the lower NLL, then the earlier run. Every candidate gets the same initialisation, batches and
draws.
"""
from __future__ import annotations

from typing import Any

import torch

from mpbench.data.base import ImageData
from mpbench.metatrain.learner import Learner, new_phi, stream_seeds

SELECT_SALT = 0x5E1EC7   # seeds of the held-out selection network (one for all candidates)


def selection_score(spec: dict[str, Any], phi_state: dict[str, torch.Tensor], data: tuple[ImageData, ImageData],
                    device: torch.device, steps: int) -> dict[str, float]:
    """Train a fresh network ``steps`` steps with phi frozen on ``data[0]``, score it on ``data[1]``."""
    from mpbench.evals.classification import predict_metrics

    sel_train, sel_valid = data
    phi = new_phi(0, device)
    phi.load_phi(phi_state, source="metatrain phi")
    bs = min(int(spec["batch_size"]), len(sel_train))
    learner = Learner(spec, sel_train, None, sel_train.num_classes, phi,
                      stream_seeds(SELECT_SALT, int(spec["seed"])), device, bs)
    learner.inner(steps)
    learner.fn.deterministic = True
    try:
        out = predict_metrics(learner.net, sel_valid.images, sel_valid.labels, 500, 1, device)
    finally:
        learner.fn.deterministic = False
    return {"acc": float(out["acc"]), "nll": float(out["nll"]), "ece": float(out["ece"])}


def choose(scores: list[dict[str, float] | None]) -> int:
    """Index of the best run: highest accuracy, then lowest NLL, then the earliest."""
    if len(scores) == 1 or any(s is None for s in scores):
        return 0
    return min(range(len(scores)), key=lambda i: (-scores[i]["acc"], scores[i]["nll"], i))
