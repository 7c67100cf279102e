"""Stochastic depth: drop whole residual branches per sample (timm DropPath) at linearly rising rates."""
from __future__ import annotations

from timm.layers import DropPath as TimmDropPath
from torch import nn

from mpbench.errors import IncompatibleError
from mpbench.hparams import between
from mpbench.regularization import Hparam, Regularizer, RunContext, register_regularizer


def _branch_sites(model: nn.Module) -> list:
    from mpbench.sites import list_sites

    return list_sites(model, "branch")


@register_regularizer("drop_path")
class DropPath(Regularizer):
    """Stochastic depth (Huang, Sun, Liu, Sedra, Weinberger, ECCV 2016): in training, each residual branch is
    dropped for a whole sample with probability p_l, out = shortcut + b * branch / (1 - p_l), b ~ Bernoulli(1 - p_l).

    Implementation: ``timm.layers.DropPath`` (scale_by_keep=True: survivors are rescaled by 1/(1 - p_l) in training
    and evaluation is the plain network; the paper instead scales branches by their survival probability at test
    time, which is the same in expectation). Placement: every "branch" site (after the last BN of the residual
    branch, before the add) of the mpbench CIFAR ResNets. Rates: the paper's linear decay rule over the L residual
    blocks in forward order, p_l = rate * l / L (l = 1..L), so the last block has p_L = ``rate``. Default rate 0.5
    is the paper's CIFAR setting (p_L = 0.5 for ResNet-110); it is strong for ResNet-20, hence the search range.
    timm models that accept ``drop_path_rate`` (model_kwargs) get the same effect natively; this plugin only
    inserts at mpbench's branch sites. Models without residual blocks are rejected at plan time.
    Evaluation: deterministic.
    """

    citation = ("Huang, Sun, Liu, Sedra, Weinberger. Deep Networks with Stochastic Depth. ECCV 2016 "
                "(arXiv 1603.09382).")
    display = "DropPath"
    hparams = {"rate": Hparam(0.5, "drop probability p_L of the last block", between(0, 1, hi_open=True))}

    @classmethod
    def check(cls, model: nn.Module, ctx: RunContext) -> None:
        if not _branch_sites(model):
            raise IncompatibleError(f"drop_path: {ctx.model_name} has no residual-branch sites (plain net, or a timm "
                                    "net: use model_kwargs.drop_path_rate there); use an mpbench ResNet/WRN")

    def attach(self, model: nn.Module) -> None:
        from mpbench.sites import insert

        sites = _branch_sites(model)
        L = len(sites)
        self.rates = [float(self.hp["rate"]) * (l + 1) / L for l in range(L)]
        for s, p in zip(sites, self.rates):
            insert(model, s.name, TimmDropPath(p, scale_by_keep=True), key="drop_path")
            self.chosen_sites.append(s.name)
