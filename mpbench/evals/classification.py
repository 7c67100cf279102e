"""Top-1 accuracy, negative log-likelihood and expected calibration error of the predictive distribution."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpbench.batches import eval_batches
from mpbench.evals import EvalContext, Evaluation, Metric, register_eval
from mpbench.hparams import Hparam, at_least


def reliability_bins(conf: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> list[dict[str, Any]]:
    """Reliability-diagram data: ``bins`` equal-width confidence bins ``(lo, hi]`` over [0, 1], each
    ``{"lo", "hi", "count", "conf", "acc"}`` (mean confidence and accuracy of its images; None when empty).

    The edge convention is Guo, Pleiss, Sun, Weinberger's reference code (``conf > lo and conf <= hi``): a
    confidence exactly on an edge belongs to the lower bin, 1.0 to the last bin, and 0 (impossible for a softmax
    maximum, which is at least 1/K) to none. mpbench keeps this definition rather than torchmetrics'
    ``multiclass_calibration_error``: that one has no public per-bin output, casts confidences to float32, and
    bins ``[lo, hi)`` with a 16th bin of its own for a confidence of exactly 1.0 (which a float32 softmax of a
    confident network often is). Away from edges the two agree (``tests/test_figures.py`` checks it on random
    data)."""
    conf, correct = conf.double(), correct.double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        n = int(inside.sum())
        out.append({"lo": lo.item(), "hi": hi.item(), "count": n,
                    "conf": conf[inside].mean().item() if n else None,
                    "acc": correct[inside].mean().item() if n else None})
    return out


def ece_from_bins(bins: list[dict[str, Any]]) -> float:
    """Expected calibration error of reliability bins: sum over bins of count/N * |acc - conf|."""
    total = sum(b["count"] for b in bins)
    return sum(b["count"] / total * abs(b["acc"] - b["conf"]) for b in bins if b["count"]) if total else 0.0


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15,
                           reliability: bool = False) -> dict[str, Any]:
    """``probs`` are (averaged) predictive probabilities (N, K). ECE: ``bins`` equal-width confidence bins
    (Guo, Pleiss, Sun, Weinberger, ICML 2017), computed from :func:`reliability_bins`; ``reliability=True`` also
    returns those bins (``reliability``: a list of per-bin dicts)."""
    probs = probs.double()
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    nll = -torch.log(probs.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12)).mean()
    table = reliability_bins(conf, correct, bins)
    out: dict[str, Any] = {"acc": correct.mean().item(), "nll": nll.item(), "ece": ece_from_bins(table)}
    if reliability:
        out["reliability"] = table
    return out


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
                    device: torch.device, bins: int = 15, reliability: bool = False) -> dict[str, Any]:
    """Accuracy, NLL and ECE (and with ``reliability`` the reliability bins) of the mean softmax over ``passes``
    forward passes."""
    return classification_metrics(*predict(model, x, y, batch_size, passes, device), bins, reliability)


def _metrics(suffix: str, how: str) -> tuple[Metric, ...]:
    return (Metric(f"acc{suffix}", f"accuracy{how}", "%", "higher", decimals=2),
            Metric(f"nll{suffix}", f"NLL{how}", "nats", "lower", decimals=3),
            Metric(f"ece{suffix}", f"ECE{how}", "%", "lower", decimals=2),
            Metric(f"reliability{suffix}", f"reliability diagram{how}", "", None, kind="array"))


@register_eval("classification")
class Classification(Evaluation):
    """Accuracy, NLL and ECE of the method's prediction, and of one deterministic pass (``*_det``).

    The prediction is the softmax averaged over the method's MC passes (one pass for deterministic methods, whose
    ``*_det`` metrics equal the others); the deterministic pass turns the method's noise off. The final evaluation
    also records the reliability diagrams behind the two ECEs (``reliability``, ``reliability_det``: one
    ``{lo, hi, count, conf, acc}`` per bin, see :func:`reliability_bins`); periodic rows carry only scalars."""

    citation = "ECE: Guo, Pleiss, Sun, Weinberger. On Calibration of Modern Neural Networks. ICML 2017."
    metrics = _metrics("", "") + _metrics("_det", " (deterministic)")
    settings = {"bins": Hparam(15, "equal-width confidence bins of the ECE", at_least(1, integer=True))}
    periodic = True

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        bins, diagram = int(self.cfg["bins"]), bool(ctx.final)
        out: dict[str, Any] = predict_metrics(ctx.model, ctx.test_x, ctx.test_y, ctx.batch_size, ctx.passes,
                                              ctx.device, bins, diagram)
        if ctx.stack.eval_protocol.stochastic:
            with ctx.stack.deterministic():
                det = predict_metrics(ctx.model, ctx.test_x, ctx.test_y, ctx.batch_size, 1, ctx.device, bins,
                                      diagram)
        else:
            det = {k: out[k] for k in out}
        out.update({f"{k}_det": v for k, v in det.items()})
        out["passes"] = ctx.passes
        return out
