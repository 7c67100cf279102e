"""Manifold mixup: mix the hidden state at a layer k drawn per batch from {input, stage 1, stage 2}."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpbench.errors import IncompatibleError
from mpbench.hparams import at_least, int_list
from mpbench.regularization import Hparam, Regularizer, RunContext, register_regularizer


def _eligible(model: nn.Module) -> list[str]:
    """Module paths whose outputs are mixing layers 1, 2: the outputs of the first two stages."""
    from mpbench.sites import stage_outputs

    return list(stage_outputs(model))[:2]


@register_regularizer("manifold_mixup")
class ManifoldMixup(Regularizer):
    """Manifold Mixup (Verma, Lamb, Beckham, Najafi, Mitliagkas, Lopez-Paz, Bengio, ICML 2019).

    Per training batch: k is drawn uniformly from the eligible layers, lam ~ Beta(alpha, alpha) (one per batch) and
    one permutation pi; the hidden state h at layer k becomes lam * h + (1 - lam) * h[pi] and the targets become
    lam * y + (1 - lam) * y[pi] (soft, (B, K), rows sum to 1). k = 0 is exactly input mixup.

    Eligible layers (as the official code's k in {0, 1, 2}): 0 = the input, 1 = the output of stage 1, 2 = the
    output of stage 2, taken from ``mpbench.sites.stage_outputs(model)[:2]``. For the CIFAR ResNets/WRN these are
    the first two residual stages; for VGG9 / Conv-4 / Conv-6 (no canonical set in the paper) they are the first
    two stage outputs that ``stage_outputs`` declares for that net. ``layers`` restricts the set (e.g. [0] is input
    mixup). Layers >= 1 are mixed by a forward hook on that module, armed by ``transform_batch`` for exactly one
    training forward; the hook does nothing in eval mode or when not armed, and ``end_forward`` disarms it.

    Loss: soft-target cross-entropy (= lam CE(y) + (1 - lam) CE(y[pi])), not the BCE on softmax of the authors'
    code. Default alpha 2.0 (the paper's CIFAR setting; the mixup author advises 0.2-0.4 for small nets such as
    ResNet-20, which the random search covers). Randomness: torch's global RNG. Evaluation: deterministic, no mixing.
    """

    citation = ("Verma, Lamb, Beckham, Najafi, Mitliagkas, Lopez-Paz, Bengio. Manifold Mixup: Better Representations "
                "by Interpolating Hidden States. ICML 2019 (arXiv 1806.05236).")
    display = "Manifold Mixup"
    hparams = {
        "alpha": Hparam(2.0, "Beta(alpha, alpha) of lambda", at_least(0)),
        "layers": Hparam([0, 1, 2], "eligible mixing layers: 0 = input, 1 / 2 = after stage 1 / 2", int_list(0, 2)),
    }
    mixes_batch = True
    graph_safe = False      # layer int(randint), lam float(Beta sample): host syncs; the mixed layer varies

    def __init__(self, ctx: RunContext, **hp: Any):
        super().__init__(ctx, **hp)
        self.layers = sorted({int(k) for k in self.hp["layers"]})
        self._armed: tuple[int, float, torch.Tensor] | None = None
        self.last: dict[str, Any] = {}
        self._handles: list = []

    @classmethod
    def check(cls, model: nn.Module, ctx: RunContext) -> None:
        layers = ctx.spec.get("reg", {}).get("manifold_mixup", {}).get("layers", cls.hparams["layers"].default)
        need = max(int(k) for k in layers)
        if need and len(_eligible(model)) < need:
            raise IncompatibleError(f"manifold_mixup: {ctx.model_name} has fewer than {need} stages to mix after; "
                                    "use reg.manifold_mixup.layers=[0]")

    def attach(self, model: nn.Module) -> None:
        paths = _eligible(model)
        self.chosen_sites = ["input" if k == 0 else paths[k - 1] for k in self.layers]
        for k in self.layers:
            if k:
                self._handles.append(model.get_submodule(paths[k - 1]).register_forward_hook(self._make_hook(k)))

    def _make_hook(self, k: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor):
            armed = self._armed
            if armed is None or armed[0] != k or not module.training:
                return None
            self._armed = None                  # one mix per training forward
            _, lam, perm = armed
            return lam * out + (1.0 - lam) * out[perm.to(out.device)]

        return hook

    def transform_batch(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = x.shape[0]
        k = self.layers[int(torch.randint(len(self.layers), ()))]
        a = float(self.hp["alpha"])
        lam = float(torch.distributions.Beta(a, a).sample()) if a > 0 else 1.0
        perm = torch.randperm(B, device=x.device)
        y = target.float() if target.ndim == 2 else F.one_hot(target.long(), int(self.ctx.num_classes)).float()
        y = lam * y + (1.0 - lam) * y[perm]
        self.last = {"k": k, "lam": lam, "perm": perm}
        if k == 0:
            self._armed = None
            return lam * x + (1.0 - lam) * x[perm], y
        self._armed = (k, lam, perm)
        return x, y

    def end_forward(self) -> None:
        self._armed = None
