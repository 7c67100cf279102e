"""Evaluation metrics: top-1 accuracy, NLL and expected calibration error (Guo et al., ICML 2017; 15 bins)."""
from __future__ import annotations

import torch


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """``probs`` are (averaged) predictive probabilities (N, K)."""
    probs = probs.double()
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    nll = -torch.log(probs.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12)).mean()
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    ece = torch.zeros((), dtype=probs.dtype)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.double().mean() * (conf[inside].mean() - correct[inside].mean()).abs()
    return {"acc": correct.mean().item(), "nll": nll.item(), "ece": ece.item()}
