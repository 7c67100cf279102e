"""CutMix through ``timm.data.Mixup``, with the area-corrected lambda."""
from __future__ import annotations

from mpbench.hparams import at_least, between
from mpbench.regularization import Hparam, register_regularizer
from regularizers.mixup import TimmMixer


@register_regularizer("cutmix")
class CutMix(TimmMixer):
    """CutMix (Yun, Han, Oh, Chun, Choe, Yoo, ICCV 2019): paste a box of the partner image; box sides are
    sqrt(1 - lam) of the image's, uniform centre, clipped to the image; lam ~ Beta(alpha, alpha) is then reset to
    1 - box_area / (H W) (``correct_lam=True``) and the targets are mixed with that lambda.

    Implementation: ``timm.data.Mixup`` with mixup off (see ``TimmMixer`` for in-place safety, odd batches and soft
    targets). Loss: soft-target cross-entropy. Placement: the input batch. Evaluation: deterministic, no mixing.
    Defaults: alpha 1.0 (lam uniform) and ``prob`` 0.5 = the official CIFAR recipe's ``cutmix_prob`` (1.0 on
    ImageNet).
    """

    citation = ("Yun, Han, Oh, Chun, Choe, Yoo. CutMix: Regularization Strategy to Train Strong Classifiers with "
                "Localizable Features. ICCV 2019 (arXiv 1905.04899).")
    display = "CutMix"
    hparams = {
        "cutmix_alpha": Hparam(1.0, "Beta(alpha, alpha) of lambda", at_least(0, strict=True)),
        "prob": Hparam(0.5, "probability of cutting a batch", between(0, 1)),
    }
    cutmix_alpha_key = "cutmix_alpha"
