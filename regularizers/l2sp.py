"""L2-SP: fine-tuning with an L2 penalty towards the starting point (the source weights)."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mpbench.hparams import at_least
from mpbench.regularization import Hparam, register_regularizer
from regularizers._transfer import SourceInit, shared_and_head_params, without_weight_decay


@register_regularizer("l2sp")
class L2SP(SourceInit):
    """L2-SP: fine-tuning plus (alpha/2)*||w_S - w0_S||^2 + (beta/2)*||w_head||^2, weight decay off.

    Initialisation is standard fine-tuning (``finetune``: every source key but the classifier's, BN included).
    S = every parameter loaded from the source (conv/linear weights and BN gamma/beta, as in TLlib's
    ``SPRegularization`` and DELTA's ``reg_l2sp``; BN running statistics are buffers and are not penalised);
    w0 = the source values, kept as a frozen copy moved lazily to the parameters' device. The head term covers the
    new classifier's weight and bias. The penalty replaces weight decay on S (decay would pull towards 0, not
    w0) and on the head (beta already decays it), so ``param_groups`` sets ``weight_decay = 0`` for both; any
    parameter that is neither (a module inserted by another regularizer) keeps the run's weight decay.

    Defaults alpha = beta = 0.01 follow DELTA's official script (``--reg_type l2_sp``, lixingjian/DELTA
    ``train.py``) and TLlib (``--trade-off-backbone 0.01 --trade-off-head 0.01 --wd 0``); the paper's own value of
    alpha (0.1) is unverified.
    """

    citation = "Li, Grandvalet, Davoine, Explicit Inductive Bias for Transfer Learning with CNNs, ICML 2018"
    display = "L2-SP"
    hparams: ClassVar[dict[str, Hparam]] = {
        "alpha": Hparam(0.01, "weight of (1/2)||w_S - w0_S||^2 (shared layers)", at_least(0)),
        "beta": Hparam(0.01, "weight of (1/2)||w_head||^2 (new classifier)", at_least(0)),
    }

    def __init__(self, ctx, **hp: Any):
        super().__init__(ctx, **hp)
        self._shared: list[nn.Parameter] = []
        self._head: list[nn.Parameter] = []
        self._w0: list[torch.Tensor] = []
        self._names: dict[str, Any] = {}

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        shared, head = shared_and_head_params(model, self.report, self.name)
        self._shared = [p for _, p in shared]
        self._head = [p for _, p in head]
        state = self.source.state
        self._w0 = [state[n].detach().to(dtype=p.dtype).clone() for n, p in shared]
        self._names = {"shared_tensors": len(shared), "head": [n for n, _ in head]}
        self.source = None      # the state_dict copy is no longer needed

    def param_groups(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return without_weight_decay(groups, self._shared + self._head)

    def penalty(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                logits: torch.Tensor) -> torch.Tensor | None:
        if not self._shared and not self._head:
            return None
        dev = (self._shared or self._head)[0].device
        if self._w0 and self._w0[0].device != dev:
            self._w0 = [w.to(dev) for w in self._w0]
        sp = torch.zeros((), device=dev)
        for p, w0 in zip(self._shared, self._w0):
            sp = sp + (p - w0).pow(2).sum()
        hd = torch.zeros((), device=dev)
        for p in self._head:
            hd = hd + p.pow(2).sum()
        return 0.5 * self.hp["alpha"] * sp + 0.5 * self.hp["beta"] * hd

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "penalised": dict(self._names)}
