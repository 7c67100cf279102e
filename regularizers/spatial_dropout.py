"""SpatialDropout: whole feature maps (channels) dropped at block sites."""
from __future__ import annotations

from torch import nn

from mpbench.errors import IncompatibleError
from mpbench.hparams import between
from mpbench.regularization import Hparam, Regularizer, RunContext, register_regularizer


@register_regularizer("spatial_dropout")
class SpatialDropout(Regularizer):
    """SpatialDropout (Tompson et al., CVPR 2015): ``nn.Dropout2d``, one Bernoulli per (sample, channel).

    A dropped channel is zeroed over all of H x W; kept channels are scaled by 1/(1-p). Placement: every "block"
    site (after the residual add, before the final ReLU; after conv+BN before ReLU in plain nets), the sites
    MetaPerturb perturbs. Evaluation: deterministic (identity in eval mode).
    """

    citation = ("Tompson, Goroshin, Jain, LeCun, Bregler. Efficient Object Localization Using Convolutional "
                "Networks. CVPR 2015.")
    display = "SpatialDropout"
    hparams = {"p": Hparam(0.1, "probability of dropping a channel", between(0, 1, hi_open=True))}

    @classmethod
    def check(cls, model: nn.Module, ctx: RunContext) -> None:
        from mpbench.sites import list_sites

        if not list_sites(model, "block"):
            raise IncompatibleError(f"spatial_dropout: {ctx.model_name} has no block sites (conv feature maps)")

    def attach(self, model: nn.Module) -> None:
        from mpbench.sites import insert, list_sites

        for s in list_sites(model, "block"):
            insert(model, s.name, nn.Dropout2d(float(self.hp["p"])), key="spatial_dropout")
            self.chosen_sites.append(s.name)
