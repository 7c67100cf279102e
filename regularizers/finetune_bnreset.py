"""Fine-tuning as in the MetaPerturb release: BatchNorm and classifier re-initialised."""
from __future__ import annotations

from mpbench.regularization import register_regularizer
from regularizers._transfer import SourceInit


@register_regularizer("finetune_bnreset")
class FineTuneBNReset(SourceInit):
    """Fine-tuning with BatchNorm reset: source weights except every BatchNorm module and the classifier.

    The MetaPerturb release (``train_tgt.py --fine_tune``) loads a same-architecture network trained on Tiny
    ImageNet but skips every key containing ``"bn"`` or ``"fc"``. Here BatchNorm is identified by module type
    (all ``_BatchNorm`` subclasses), so BOTH its affine parameters AND its buffers (running mean/var,
    ``num_batches_tracked``) keep their fresh initialisation, wherever the module sits; the classifier
    (``get_classifier()``, ``fc``) is never loaded. On the release's CIFAR ResNets/VGG/ConvNets this is the same
    set of keys; it differs only for BN inside projection shortcuts (ResNet-18/34 ``downsample.1``), which the
    release's substring rule loads.
    """

    citation = "Ryu et al., MetaPerturb, NeurIPS 2020 (release: JWoong148/MetaPerturb train_tgt.py --fine_tune)"
    display = "FT (BN reset)"
    skip_bn = True
