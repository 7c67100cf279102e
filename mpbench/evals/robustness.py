"""Adversarial robustness without adversarial training: accuracy under l_inf, l_2 and l_1 PGD with Expectation
over Transformation against the method's own randomness, over a grid of eps per norm (MetaPerturb, Fig. 6).

The protocol is the MetaPerturb supplementary's (Ryu, Shin, Lee, Hwang, NeurIPS 2020, supp. Fig. 1): projected
gradient descent (Madry et al., ICLR 2018) run for ``steps`` = 200 steps from the clean image, each step using
the mean input gradient of the cross-entropy over ``samples`` = 10 stochastic forward passes (EoT: Athalye,
Carlini, Wagner, ICML 2018; Athalye, Engstrom, Ilyas, Kwok, ICML 2018), with inner step size 0.025 * eps for
l_inf and l_2 and 0.033 * eps for l_1.

**Units.** eps is measured in pixel units, images in [0, 1] (so l_inf 8/255 is 0.0314): the attack perturbs the
[0, 1] image ``x01``, clips it to the valid pixel box [0, 1] after every step, and the model sees the runner's
normalisation ``(x01 - 0.5) / 0.5`` (:func:`mpbench.batches.standardise`), i.e. a perturbation of 2 * eps in the
model's normalised input units. Adversarial images are not re-quantised to 8 bits.

**Steps and projections.** l_inf: ``x + a * sign(g)``, then clip to the eps-cube (Madry et al.). l_2:
``x + a * g / ||g||_2``, then rescale into the eps-ball (the exact Euclidean projection). l_1: the sparse
steepest-ascent step of Tramer & Boneh (NeurIPS 2019, "Adversarial Training and Robustness for Multiple
Perturbations", SLIDE): the signs of the top ``l1_fraction`` of coordinates by |g| (those pinned at the pixel box
and pushing outward excluded), scaled to l_1 length ``a``; then the exact Euclidean projection onto the l_1 ball
(sort-based, Duchi, Shalev-Shwartz, Singer, Chandra, ICML 2008). The box clip after an l_1 (or l_2) projection
only shrinks each coordinate's change, so every iterate lies in both the ball and the box (a feasible point of
their intersection, not the exact projection onto it).

**Model and prediction.** The model stays in the mode of its evaluation protocol (``model.eval()``, the
method's noise as at evaluation): a method whose protocol is stochastic (``ctx.stack.eval_protocol.stochastic``:
MetaPerturb's MC passes) is attacked with ``samples`` gradient samples per step, a deterministic one with exactly
one (its gradient is the same each time). An image counts as correct under attack when the method's own
prediction on the adversarial image is right: the softmax averaged over ``ctx.passes`` passes (as the
classification evaluation predicts); with ``skip_misclassified`` (default) an image whose clean prediction is wrong
is counted as wrong at every eps without being attacked (robust accuracy <= clean accuracy on the subset).

**Subset.** ``images`` test images (default 500; null = the whole test split), chosen without randomness:
``subset: spread`` (default) takes the indices ``round(linspace(0, N - 1, images))`` of the test split in file
order (fine-grained test splits are stored class by class, so this covers every class), ``first`` the first
``images``. Cost: each image takes ``steps x samples`` forward+backward passes per eps (200 x 12 eps x 1 = 2,400
for a deterministic method, x 10 for MetaPerturb), on top of ``ctx.passes`` predictions per eps.

Results (``final``): ``robust_clean_acc`` (the clean accuracy on the subset), ``robust_linf``, ``robust_l2``,
``robust_l1`` (``[{"eps": e, "acc": a}, ...]`` in grid order, eps in pixel units, acc a fraction), ``robust_images``,
and ``robust_settings`` (the protocol as run: settings, gradient samples used, MC passes, subset indices rule).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mpbench.batches import standardise
from mpbench.evals import EvalContext, Evaluation, Metric, register_eval
from mpbench.hparams import Check, Hparam, at_least, between, boolean, one_of, optional

NORMS = ("linf", "l2", "l1")
SUBSETS = ("spread", "first")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def eps_grid(max_eps: float | None = None) -> Check:
    """A list of distinct numbers > 0 (<= ``max_eps``); [] skips the norm."""
    text = ("a list of distinct numbers > 0" + (f" and <= {max_eps:g}" if max_eps is not None else "")
            + " ([] skips this norm)")

    def check(v: Any) -> str | None:
        ok = (isinstance(v, (list, tuple)) and all(_number(e) and e > 0 and (max_eps is None or e <= max_eps)
                                                   for e in v) and len(set(v)) == len(v))
        return None if ok else text

    return check


# ---- the attack -----------------------------------------------------------------------------------------------------

def project_l1_ball(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each row of ``delta`` (B, d) onto the l_1 ball of radius ``eps``: soft-thresholding
    at the theta found by sorting (Duchi, Shalev-Shwartz, Singer, Chandra, ICML 2008, Fig. 1, applied to |delta|
    with the signs put back). Rows already inside are returned unchanged."""
    a = delta.abs()
    d = a.shape[1]
    mu = a.sort(dim=1, descending=True).values
    cs = mu.cumsum(dim=1)
    j = torch.arange(1, d + 1, device=a.device, dtype=a.dtype)
    rho = ((mu - (cs - eps) / j) > 0).sum(dim=1).clamp_min(1)           # the condition holds exactly for j <= rho
    theta = ((cs.gather(1, (rho - 1)[:, None]).squeeze(1) - eps) / rho.to(a.dtype)).clamp_min(0)
    out = delta.sign() * (a - theta[:, None]).clamp_min(0)
    return torch.where((a.sum(dim=1) <= eps)[:, None], delta, out)


def project(x: torch.Tensor, x0: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """``x`` moved into the ``norm`` ball of radius ``eps`` around ``x0``, then clipped to the pixel box [0, 1]."""
    delta = (x - x0).flatten(1)
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        delta = delta * (eps / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    elif norm == "l1":
        delta = project_l1_ball(delta, eps)
    else:
        raise ValueError(f"unknown norm {norm!r}: one of {NORMS}")
    return (x0 + delta.view_as(x0)).clamp(0.0, 1.0)


def ascent_direction(g: torch.Tensor, x: torch.Tensor, norm: str, l1_fraction: float = 0.01) -> torch.Tensor:
    """The steepest-ascent step of unit ``norm`` length for the gradient ``g`` at ``x`` (l_1: the sparse sign step
    of Tramer & Boneh 2019 on the top ``l1_fraction`` of coordinates that can still move inside the box)."""
    flat = g.flatten(1)
    if norm == "linf":
        return g.sign()
    if norm == "l2":
        return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(g)
    if norm != "l1":
        raise ValueError(f"unknown norm {norm!r}: one of {NORMS}")
    xf = x.flatten(1)
    flat = torch.where(((xf <= 0) & (flat < 0)) | ((xf >= 1) & (flat > 0)), torch.zeros_like(flat), flat)
    k = max(1, int(math.ceil(l1_fraction * flat.shape[1])))
    top = flat.abs().topk(k, dim=1).indices
    e = torch.zeros_like(flat).scatter_(1, top, flat.gather(1, top).sign())
    return (e / e.abs().sum(dim=1, keepdim=True).clamp_min(1.0)).view_as(g)


def random_start(x0: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """A point drawn uniformly from the ``norm`` ball of radius ``eps`` around ``x0`` (then box-clipped)."""
    b, d = x0.shape[0], x0[0].numel()
    if norm == "linf":
        delta = torch.empty_like(x0).uniform_(-eps, eps).flatten(1)
    elif norm == "l2":
        u = torch.randn(b, d, device=x0.device, dtype=x0.dtype)
        r = torch.rand(b, 1, device=x0.device, dtype=x0.dtype) ** (1.0 / d)
        delta = eps * r * u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    else:   # uniform in the l_1 ball: d of d + 1 exponentials over their sum, with random signs
        e = torch.empty(b, d + 1, device=x0.device, dtype=x0.dtype).exponential_()
        signs = torch.randint(0, 2, (b, d), device=x0.device).to(x0.dtype) * 2 - 1
        delta = eps * signs * e[:, :d] / e.sum(dim=1, keepdim=True)
    return (x0 + delta.view_as(x0)).clamp(0.0, 1.0)


def pgd_eot(forward: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, y: torch.Tensor, *, norm: str,
            eps: float, steps: int, rel_step: float, samples: int = 1, l1_fraction: float = 0.01,
            start_random: bool = False,
            on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Untargeted PGD (Madry et al., ICLR 2018) on the cross-entropy, the gradient of each step averaged over
    ``samples`` forward passes (EoT, Athalye et al., ICML 2018); ``samples=1`` is plain PGD.

    ``forward`` maps [0, 1] images to logits; ``x0`` (B, ...) in [0, 1]; step size ``rel_step * eps``; every iterate
    is in the ``norm`` ball of radius ``eps`` around ``x0`` and in [0, 1]. ``on_step(t, x)`` sees each iterate."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: one of {NORMS}")
    alpha = float(rel_step) * float(eps)
    x0 = x0.detach()
    x = random_start(x0, norm, eps) if start_random else x0.clone()
    with torch.enable_grad():
        for t in range(int(steps)):
            g = torch.zeros_like(x)
            for _ in range(int(samples)):
                xr = x.detach().requires_grad_(True)
                loss = F.cross_entropy(forward(xr).float(), y, reduction="sum")
                g += torch.autograd.grad(loss, xr)[0]
            g /= int(samples)
            x = project(x.detach() + alpha * ascent_direction(g, x, norm, l1_fraction), x0, norm, eps)
            if on_step is not None:
                on_step(t, x)
    return x.detach()


@torch.no_grad()
def correct(forward: Callable[[torch.Tensor], torch.Tensor], x01: torch.Tensor, y: torch.Tensor,
            passes: int) -> torch.Tensor:
    """Whether the method's prediction (argmax of the softmax averaged over ``passes`` passes) is ``y``."""
    p = sum(F.softmax(forward(x01).float(), dim=-1) for _ in range(int(passes)))
    return p.argmax(dim=-1) == y


def subset_indices(n: int, images: int | None, how: str) -> torch.Tensor:
    """The attacked test images: all, the first ``images``, or ``images`` spread evenly over the file order."""
    if images is None or images >= n:
        return torch.arange(n)
    if how == "first":
        return torch.arange(int(images))
    return torch.linspace(0, n - 1, int(images), dtype=torch.float64).round().long().unique()


# ---- the evaluation -------------------------------------------------------------------------------------------------

def _acc_metric(norm: str, name: str) -> Metric:
    return Metric(f"robust_{norm}", f"accuracy under {name} PGD-EoT, per eps", "%", "higher", kind="array",
                  decimals=2)


@register_eval("robustness")
class Robustness(Evaluation):
    """Accuracy under l_inf, l_2 and l_1 PGD with EoT over the method's own noise, per eps (no adversarial training).

    See the module docstring for the protocol, units (eps in [0, 1] pixel units) and cost."""

    citation = ("Ryu, Shin, Lee, Hwang. MetaPerturb: Transferable Regularizer for Heterogeneous Tasks and "
                "Architectures. NeurIPS 2020 (Fig. 6, supp. Fig. 1). PGD: Madry, Makelov, Schmidt, Tsipras, Vladu, "
                "ICLR 2018. EoT: Athalye, Carlini, Wagner, ICML 2018; Athalye, Engstrom, Ilyas, Kwok, ICML 2018. "
                "l_1 step: Tramer, Boneh, NeurIPS 2019. l_1 projection: Duchi, Shalev-Shwartz, Singer, Chandra, "
                "ICML 2008.")
    metrics = (Metric("robust_clean_acc", "clean accuracy (robustness subset)", "%", "higher", decimals=2),
               _acc_metric("linf", "l_inf"), _acc_metric("l2", "l_2"), _acc_metric("l1", "l_1"),
               Metric("robust_images", "images attacked", "", None, decimals=0))
    settings = {
        "images": Hparam(500, "test images attacked (null: the whole test split)",
                         optional(at_least(1, integer=True))),
        "subset": Hparam("spread", "which: spread (round(linspace(0, N-1, images)) in file order) | first",
                         one_of(*SUBSETS)),
        "linf_eps": Hparam([1 / 255, 2 / 255, 4 / 255, 8 / 255], "l_inf radii, [0, 1] pixel units ([] skips)",
                           eps_grid(1.0)),
        "l2_eps": Hparam([0.25, 0.5, 1.0, 2.0], "l_2 radii, [0, 1] pixel units ([] skips)", eps_grid()),
        "l1_eps": Hparam([4.0, 8.0, 16.0, 32.0], "l_1 radii, [0, 1] pixel units ([] skips)", eps_grid()),
        "steps": Hparam(200, "PGD steps", at_least(1, integer=True)),
        "samples": Hparam(10, "EoT gradient samples per step of a stochastic method (a deterministic one: 1)",
                          at_least(1, integer=True)),
        "linf_step": Hparam(0.025, "l_inf step size as a fraction of eps", between(0, 1, lo_open=True)),
        "l2_step": Hparam(0.025, "l_2 step size as a fraction of eps", between(0, 1, lo_open=True)),
        "l1_step": Hparam(0.033, "l_1 step size as a fraction of eps", between(0, 1, lo_open=True)),
        "l1_fraction": Hparam(0.01, "fraction of coordinates an l_1 step moves (the top |gradient|)",
                              between(0, 1, lo_open=True)),
        "random_start": Hparam(False, "start at a uniform point of the ball (else at the clean image)", boolean),
        "skip_misclassified": Hparam(True, "count an image misclassified clean as wrong without attacking it",
                                     boolean),
        "batch_size": Hparam(100, "images attacked at once", at_least(1, integer=True)),
    }
    periodic = False

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        cfg = self.cfg
        stochastic = bool(ctx.stack.eval_protocol.stochastic)
        samples = int(cfg["samples"]) if stochastic else 1
        passes = int(ctx.passes)
        grids = {n: [float(e) for e in cfg[f"{n}_eps"]] for n in NORMS}
        n_all = len(ctx.test_y)
        idx = subset_indices(n_all, cfg["images"], cfg["subset"])
        model: nn.Module = ctx.model
        model.eval()

        def forward(x01: torch.Tensor) -> torch.Tensor:
            return model(standardise(x01))

        clean = 0
        hits = {n: [0] * len(grids[n]) for n in NORMS}
        bs = int(cfg["batch_size"])
        for i in range(0, len(idx), bs):
            b = idx[i:i + bs]
            x0 = ctx.test_x[b].to(ctx.device).float() / 255.0
            y = ctx.test_y[b].to(ctx.device)
            ok = correct(forward, x0, y, passes)
            clean += int(ok.sum())
            todo = ok if cfg["skip_misclassified"] else torch.ones_like(ok)
            if not todo.any():
                continue
            xa, ya = x0[todo], y[todo]
            for norm in NORMS:
                for j, eps in enumerate(grids[norm]):
                    adv = pgd_eot(forward, xa, ya, norm=norm, eps=eps, steps=int(cfg["steps"]),
                                  rel_step=float(cfg[f"{norm}_step"]), samples=samples,
                                  l1_fraction=float(cfg["l1_fraction"]), start_random=bool(cfg["random_start"]))
                    hits[norm][j] += int(correct(forward, adv, ya, passes).sum())
        n = len(idx)
        out: dict[str, Any] = {"robust_clean_acc": clean / n, "robust_images": n}
        for norm in NORMS:
            if grids[norm]:
                out[f"robust_{norm}"] = [{"eps": e, "acc": h / n} for e, h in zip(grids[norm], hits[norm])]
        rule = ("all" if n == n_all else
                f"first {n}" if cfg["subset"] == "first" else f"round(linspace(0, {n_all - 1}, {n}))")
        out["robust_settings"] = {**{k: cfg[k] for k in self.settings}, "eps_unit": "pixel [0, 1]",
                                  "stochastic": stochastic, "samples_used": samples, "passes": passes,
                                  "test_images": n_all, "indices": rule}
        return out
