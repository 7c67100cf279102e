"""Label smoothing: soft targets (1 - eps) y + eps / K."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mpbench.hparams import between
from mpbench.regularization import Hparam, Regularizer, register_regularizer


@register_regularizer("label_smoothing")
class LabelSmoothing(Regularizer):
    """Label smoothing (Szegedy, Vanhoucke, Ioffe, Shlens, Wojna, CVPR 2016, Sec. 7): the target becomes
    (1 - eps) * y + eps / K, with K the number of classes (so the true class gets 1 - eps + eps/K).

    Works on int labels (one-hot first) and on soft targets (e.g. after a batch mixer); since both operations are
    linear, smoothing and mixing commute. The trainer applies soft-target cross-entropy, which equals
    ``F.cross_entropy(label_smoothing=eps)``. Placement: the targets only. Evaluation: deterministic; targets and
    NLL at evaluation are unsmoothed.
    """

    citation = ("Szegedy, Vanhoucke, Ioffe, Shlens, Wojna. Rethinking the Inception Architecture for Computer "
                "Vision. CVPR 2016 (arXiv 1512.00567).")
    display = "Label Smoothing"
    hparams = {"eps": Hparam(0.1, "smoothing mass spread uniformly over classes", between(0, 1))}

    def transform_batch(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K = int(self.ctx.num_classes)
        y = target.float() if target.ndim == 2 else F.one_hot(target.long(), K).float()
        eps = float(self.hp["eps"])
        return x, y * (1.0 - eps) + eps / K
