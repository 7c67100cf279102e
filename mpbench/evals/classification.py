"""Top-1 accuracy, negative log-likelihood and expected calibration error of the predictive distribution."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpbench.batches import eval_batches
from mpbench.evals import EvalContext, Evaluation, Metric, register_eval
from mpbench.hparams import Hparam, at_least


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """``probs`` are (averaged) predictive probabilities (N, K). ECE: ``bins`` equal-width confidence bins
    (Guo, Pleiss, Sun, Weinberger, ICML 2017)."""
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


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, passes: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean softmax over ``passes`` forward passes per test image, labels), on the CPU."""
    model.eval()
    probs, labels = [], []
    for xb, yb in eval_batches(x, y, batch_size, device):
        p = sum(F.softmax(model(xb).float(), dim=-1) for _ in range(passes)) / passes
        probs.append(p.cpu())
        labels.append(yb.cpu())
    return torch.cat(probs), torch.cat(labels)


def predict_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, passes: int,
                    device: torch.device, bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL and ECE of the mean softmax over ``passes`` forward passes."""
    return classification_metrics(*predict(model, x, y, batch_size, passes, device), bins)


def _metrics(suffix: str, how: str) -> tuple[Metric, ...]:
    return (Metric(f"acc{suffix}", f"accuracy{how}", "%", "higher", decimals=2),
            Metric(f"nll{suffix}", f"NLL{how}", "nats", "lower", decimals=3),
            Metric(f"ece{suffix}", f"ECE{how}", "%", "lower", decimals=2))


@register_eval("classification")
class Classification(Evaluation):
    """Accuracy, NLL and ECE of the method's prediction, and of one deterministic pass (``*_det``).

    The prediction is the softmax averaged over the method's MC passes (one pass for deterministic methods, whose
    ``*_det`` metrics equal the others); the deterministic pass turns the method's noise off."""

    citation = "ECE: Guo, Pleiss, Sun, Weinberger. On Calibration of Modern Neural Networks. ICML 2017."
    metrics = _metrics("", "") + _metrics("_det", " (deterministic)")
    settings = {"bins": Hparam(15, "equal-width confidence bins of the ECE", at_least(1, integer=True))}
    periodic = True

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        bins = int(self.cfg["bins"])
        out: dict[str, Any] = predict_metrics(ctx.model, ctx.test_x, ctx.test_y, ctx.batch_size, ctx.passes,
                                              ctx.device, bins)
        out["passes"] = ctx.passes
        if ctx.stack.eval_protocol.stochastic:
            with ctx.stack.deterministic():
                det = predict_metrics(ctx.model, ctx.test_x, ctx.test_y, ctx.batch_size, 1, ctx.device, bins)
            out.update({f"{k}_det": v for k, v in det.items()})
        else:
            out.update({f"{k}_det": out[k] for k in ("acc", "nll", "ece")})
        return out
