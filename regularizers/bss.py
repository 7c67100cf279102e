"""BSS: batch spectral shrinkage of the penultimate features."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mpbench.hparams import at_least
from mpbench.regularization import Hparam, Regularizer, RunContext, register_regularizer
from regularizers._transfer import classifier_name


def bss_value(features: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the k smallest squared singular values of the (b, d) feature matrix (k capped at min(b, d))."""
    f = features.flatten(1).float()
    with torch.autocast(device_type=f.device.type, enabled=False):
        s = torch.linalg.svdvals(f)         # descending, min(b, d) values
    k = max(0, min(int(k), s.numel()))
    return s[s.numel() - k:].pow(2).sum()


@register_regularizer("bss")
class BSS(Regularizer):
    """Batch Spectral Shrinkage: eta * sum of the k smallest squared singular values of the batch's features.

    F (b x d) = the penultimate features of the training batch: the input of the classifier module
    (``get_classifier()``, ``fc``), i.e. the globally pooled features that timm's ``forward_head(x,
    pre_logits=True)`` returns, captured by a forward pre-hook during the step's forward (no extra pass). Not
    centred, as in the official code. With b < d there are only b singular values; k is capped at min(b, d).
    Defaults k = 1, eta = 0.001 (thuml/Batch-Spectral-Shrinkage ``BSS.py``; TLlib ``--k 1 --trade-off 0.001``).
    BSS loads no weights: compose it with fine-tuning, e.g. ``regularizer: [finetune, bss]``. A non-finite F or
    value gives a zero penalty for that step (counted in ``describe()["nan_skips"]``).
    """

    citation = ("Chen et al., Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for Safe "
                "Transfer Learning, NeurIPS 2019")
    display = "BSS"
    graph_safe = False      # penalty: bool(isfinite(...)) host syncs decide each step's value (nan_skips)
    hparams: ClassVar[dict[str, Hparam]] = {
        "eta": Hparam(0.001, "weight of the spectral penalty", at_least(0)),
        "k": Hparam(1, "number of smallest singular values penalised", at_least(1, integer=True)),
    }

    def __init__(self, ctx: RunContext, **hp: Any):
        super().__init__(ctx, **hp)
        self._feat: torch.Tensor | None = None
        self._handle: Any = None
        self.nan_skips = 0

    @classmethod
    def check(cls, model: nn.Module, ctx: RunContext) -> None:
        classifier_name(model, cls.name)

    def attach(self, model: nn.Module) -> None:
        head = classifier_name(model, self.name)
        self._handle = model.get_submodule(head).register_forward_pre_hook(self._hook)
        self.chosen_sites = [f"{head}:input"]

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if module.training and torch.is_grad_enabled():
            self._feat = inputs[0]

    def penalty(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                logits: torch.Tensor) -> torch.Tensor | None:
        f = self._feat
        if f is None:
            raise RuntimeError("bss: no penultimate features captured in this step's forward (classifier not called)")
        zero = torch.zeros((), device=f.device)
        if not bool(torch.isfinite(f).all()):
            self.nan_skips += 1
            return zero
        v = self.hp["eta"] * bss_value(f, self.hp["k"])
        if not bool(torch.isfinite(v)):
            self.nan_skips += 1
            return zero
        return v

    def end_forward(self) -> None:
        self._feat = None

    def state_dict(self) -> dict[str, Any]:
        return {"nan_skips": self.nan_skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nan_skips = int(state.get("nan_skips", 0))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["nan_skips"] = self.nan_skips
        return d
