"""Element-wise (inverted) dropout before the classifier and/or at block sites."""
from __future__ import annotations


from torch import nn

from mpbench.errors import IncompatibleError
from mpbench.sites import find_classifier
from mpbench.hparams import between, one_of
from mpbench.regularization import Hparam, Regularizer, RunContext, register_regularizer

WHERE = ("head", "blocks", "both")


def _head_dropout_pre_hook(module: nn.Module, args: tuple) -> tuple:
    # module-level (picklable, deepcopy-safe): the dropout lives on the classifier itself
    return (module.mpbench_pre_dropout(args[0]),) + tuple(args[1:])


def classifier_of(model: nn.Module) -> nn.Module | None:
    found = find_classifier(model)
    return found[1] if found else None


@register_regularizer("dropout")
class Dropout(Regularizer):
    """Dropout (Srivastava et al., JMLR 2014): element-wise Bernoulli mask, inverted scaling 1/(1-p).

    Placement (``where``): ``"head"`` = on the pooled features right before the classifier (a forward pre-hook
    on ``model.get_classifier()``; the ``nn.Dropout`` is registered on the classifier as ``mpbench_pre_dropout``
    and adds no state_dict keys); ``"blocks"`` = at every "block" site (after the residual add, before the final
    ReLU; after conv+BN before ReLU in plain nets; since the mask is >= 0, ReLU(drop(x)) = drop(ReLU(x))); ``"both"``.
    Evaluation: deterministic (dropout is the identity in eval mode).
    """

    citation = ("Srivastava, Hinton, Krizhevsky, Sutskever, Salakhutdinov. Dropout: A Simple Way to Prevent Neural "
                "Networks from Overfitting. JMLR 15, 2014.")
    display = "Dropout"
    hparams = {
        "p": Hparam(0.1, "drop probability of each unit", between(0, 1, hi_open=True)),
        "where": Hparam("head", "head | blocks | both", one_of(*WHERE)),
    }

    @classmethod
    def check(cls, model: nn.Module, ctx: RunContext) -> None:
        from mpbench.sites import list_sites

        where = ctx.spec.get("reg", {}).get("dropout", {}).get("where", cls.hparams["where"].default)
        if where in ("head", "both") and classifier_of(model) is None:
            raise IncompatibleError(f"dropout: {ctx.model_name} has no classifier to put head dropout before")
        if where in ("blocks", "both") and not list_sites(model, "block"):
            raise IncompatibleError(f"dropout: {ctx.model_name} has no block sites; use reg.dropout.where=head")

    def attach(self, model: nn.Module) -> None:
        from mpbench.sites import insert, list_sites

        p, where = float(self.hp["p"]), self.hp["where"]
        if where in ("head", "both"):
            clf = classifier_of(model)
            clf.add_module("mpbench_pre_dropout", nn.Dropout(p))
            clf.register_forward_pre_hook(_head_dropout_pre_hook)
            self.chosen_sites.append("head")
        if where in ("blocks", "both"):
            for s in list_sites(model, "block"):
                insert(model, s.name, nn.Dropout(p), key="dropout")
                self.chosen_sites.append(s.name)
