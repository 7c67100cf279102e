"""Standard fine-tuning (FT): start from the source network's weights, with a new classifier."""
from __future__ import annotations

from mpbench.regularization import register_regularizer
from regularizers._transfer import SourceInit


@register_regularizer("finetune")
class FineTune(SourceInit):
    """Fine-tuning: all source weights (BatchNorm included) except the classifier, which is re-initialised.

    Loads ``model.pt`` of the run's ``pretrain`` artifact (same architecture, trained on the source dataset); every
    key except the classifier's is copied, BatchNorm affine parameters and running statistics included. Nothing
    else changes: all layers train with the run's optimizer, learning rate and weight decay. ``describe()["transfer"]``
    records how many keys were loaded and skipped. For the MetaPerturb release's variant (BatchNorm re-initialised)
    use ``finetune_bnreset``.
    """

    citation = "standard transfer-learning baseline; e.g. Yosinski et al., NeurIPS 2014"
    display = "Fine-tuning"
    skip_bn = False
