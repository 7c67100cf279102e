"""Input mixup through ``timm.data.Mixup``, producing soft targets."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup as TimmMixup

from mpbench.hparams import at_least, between
from mpbench.regularization import Hparam, Regularizer, RunContext, register_regularizer


def soft_targets(target: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,) int labels -> (B, K) one-hot; (B, K) soft targets are returned as they are (as ``dtype``)."""
    if target.ndim == 2:
        return target.to(dtype)
    return F.one_hot(target.long(), num_classes).to(dtype)


class TimmMixer(Regularizer):
    """Shared by ``mixup`` and ``cutmix``: wraps ``timm.data.Mixup`` (mode 'batch': one lambda per batch; the
    partner of sample i is sample B-1-i of the reversed batch, so the loader must shuffle).

    - ``num_classes`` = the run's classes and ``label_smoothing=0`` are always passed explicitly (timm's defaults
      are 1000 and 0.1).
    - timm mixes x in place: ``transform_batch`` clones x first, so the caller's tensor is never modified.
    - Odd batch sizes (timm asserts an even batch): the first B-1 samples are mixed among themselves and the last
      sample passes through unmixed with its own target.
    - Targets: int labels become one-hot, incoming soft targets (e.g. label smoothing listed first) stay as they
      are; both are mixed with the lambda timm used on the images (read back from timm's target for probe labels),
      y~ = lam * y + (1 - lam) * y.flip(0). They leave as (B, K) float rows summing to 1; the trainer uses
      soft-target cross-entropy.
    - lambda comes from numpy's global RNG (timm's choice); the harness seeds numpy with the run seed.
    """

    mixes_batch = True
    graph_safe = False      # lambda from numpy's RNG and float(probe target) each step; CutMix: box from it
    mixup_alpha_key: str | None = None
    cutmix_alpha_key: str | None = None
    last_lam: float = 1.0

    def __init__(self, ctx: RunContext, **hp: Any):
        super().__init__(ctx, **hp)
        self.mixer = TimmMixup(
            mixup_alpha=float(self.hp[self.mixup_alpha_key]) if self.mixup_alpha_key else 0.0,
            cutmix_alpha=float(self.hp[self.cutmix_alpha_key]) if self.cutmix_alpha_key else 0.0,
            cutmix_minmax=None, prob=float(self.hp["prob"]), switch_prob=0.0, mode="batch", correct_lam=True,
            label_smoothing=0.0, num_classes=int(ctx.num_classes))
        self.chosen_sites = ["input"]

    def transform_batch(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = x.shape[0]
        n = B - (B % 2)
        K = int(self.ctx.num_classes)
        out_x = x.clone()
        if n == 0:
            self.last_lam = 1.0
            return out_x, soft_targets(target, K)
        head_x = out_x[:n]                      # a view: timm mixes it in place, inside our clone
        # timm is given probe labels (0 .. 0, 1 .. 1): under its batch flip, row 0 of its target is
        # lam * e_0 + (1 - lam) * e_1, which reads back the exact lambda it used (area-corrected for CutMix)
        probe = (torch.arange(n, device=x.device) >= n // 2).long()
        _, probe_t = self.mixer(head_x, probe)
        lam = float(probe_t[0, 0])
        t = soft_targets(target, K)
        head_t = lam * t[:n] + (1.0 - lam) * t[:n].flip(0)
        self.last_lam = lam
        return out_x, torch.cat([head_t, t[n:]], 0)


@register_regularizer("mixup")
class Mixup(TimmMixer):
    """Input mixup (Zhang, Cisse, Dauphin, Lopez-Paz, ICLR 2018): x~ = lam x_i + (1 - lam) x_j, y~ likewise,
    lam ~ Beta(alpha, alpha), one lambda per batch.

    Implementation: ``timm.data.Mixup`` with cutmix off (see ``TimmMixer`` for in-place safety, odd batches and soft
    targets). Loss: soft-target cross-entropy, which equals the official lam*CE(y_i) + (1-lam)*CE(y_j).
    Placement: the input batch. Evaluation: deterministic, no mixing. Default alpha 1.0 (the paper's CIFAR
    setting; the authors advise 0.2-0.4 for small nets such as ResNet-20, which the random search covers).
    """

    citation = ("Zhang, Cisse, Dauphin, Lopez-Paz. mixup: Beyond Empirical Risk Minimization. ICLR 2018 "
                "(arXiv 1710.09412).")
    display = "Mixup"
    hparams = {
        "mixup_alpha": Hparam(1.0, "Beta(alpha, alpha) of lambda", at_least(0, strict=True)),
        "prob": Hparam(1.0, "probability of mixing a batch", between(0, 1)),
    }
    mixup_alpha_key = "mixup_alpha"
