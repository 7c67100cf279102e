"""Information dropout: input-dependent log-normal multiplicative noise with an information-bottleneck KL."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from mpbench.errors import IncompatibleError
from mpbench.hparams import at_least, one_of
from mpbench.regularization import Hparam, Regularizer, RunContext, register_regularizer

HEADS = ("conv3x3", "conv1x1")
WHERE = ("blocks", "stages")


class InformationDropout(nn.Module):
    """out = x * eps, eps = exp(alpha * sigma0 * N(0, 1)), alpha = 0.001 + max_alpha * sigmoid(head(x)).

    alpha is the standard deviation of log(eps) (eps ~ logNormal(0, alpha^2), mean exp(alpha^2 / 2), not mean 1).
    In training the per-unit KL to the log-uniform prior, -log(alpha / (max_alpha + 0.001)) (0 at the largest
    alpha), is summed over units and averaged over the batch into ``self.kl``. In eval mode, or with ``noise_on``
    False, or sigma0 = 0, eps = 1 and the module is the identity.
    """

    def __init__(self, channels: int, max_alpha: float = 0.7, sigma0: float = 1.0, head: str = "conv3x3"):
        super().__init__()
        k = 3 if head == "conv3x3" else 1
        self.alpha_head = nn.Conv2d(channels, channels, k, padding=k // 2, bias=True)
        self.max_alpha = float(max_alpha)
        self.sigma0 = float(sigma0)
        self.noise_on = True
        self.kl: torch.Tensor | None = None

    def alpha(self, x: torch.Tensor) -> torch.Tensor:
        return 0.001 + self.max_alpha * torch.sigmoid(self.alpha_head(x))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training or not self.noise_on:
            return x
        alpha = self.alpha(x)
        kl = -torch.log(alpha / (self.max_alpha + 0.001))
        self.kl = kl.flatten(1).sum(1).mean()
        noise = torch.randn_like(x) if noise is None else noise
        return x * torch.exp(alpha * self.sigma0 * noise)

    def extra_repr(self) -> str:
        return f"max_alpha={self.max_alpha}, sigma0={self.sigma0}"


def _sites(model: nn.Module, where: str) -> list:
    from mpbench.sites import list_sites

    sites = list_sites(model, "block")
    if where == "stages":                       # the last block site of every stage
        last = {s.stage: s for s in sites}
        sites = [s for s in sites if last[s.stage] is s]
    return sites


@register_regularizer("info_dropout")
class InfoDropout(Regularizer):
    """Information Dropout (Achille & Soatto, TPAMI 2018, arXiv 1611.01353): multiplicative noise
    eps ~ logNormal(0, alpha(x)^2) whose scale is predicted from the features, with an information-bottleneck KL.

    Convention (as the reference code): alpha = std of log(eps) = 0.001 + max_alpha * sigmoid(head(h)), max_alpha
    0.7, eps = exp(alpha * sigma0 * N(0, 1)) with sigma0 = 1 in training; eps is not mean-preserving, which the BN
    re-estimation below absorbs. KL (ReLU / log-uniform prior) = -log(alpha / (max_alpha + 0.001)) per unit, 0 at the
    largest alpha; penalty = beta * sum over sites of (sum over units, mean over batch) / N_train (ctx.num_train),
    as the reference (so beta is comparable to variational dropout's; reference CIFAR beta = 3.0).

    alpha head: a 3x3 conv C -> C with bias and no BN (the reference's parallel alpha-conv has the main conv's shape;
    here it reads the site's activation h, since a site only sees its own tensor). ``head="conv1x1"`` is a cheaper,
    documented deviation. Placement: ``where="blocks"``: every "block" site (MetaPerturb's sites: after the residual
    add / after conv+BN, before the ReLU; eps > 0 so ReLU(h * eps) = ReLU(h) * eps, i.e. the noise acts on the
    ReLU output as the KL assumes); ``where="stages"`` (default): only the last block site of every stage (fewer noisy
    layers, nearer the reference's two). Where MetaPerturb's authors placed it is unknown. Measured here (ResNet-20,
    digits 50/class, 150 steps): every block site at beta 3 stays at chance; the last site of each stage learns.

    Evaluation: deterministic, noise off (sigma0 = 0). ``before_eval`` repeats the reference's "dry run": noise
    off, all BatchNorm layers reset and re-estimated in train mode with momentum None (cumulative average) over
    ``bn_batches`` training batches (0 disables), then every module's mode and momentum are restored.
    """

    citation = ("Achille, Soatto. Information Dropout: Learning Optimal Representations Through Noisy Computation. "
                "IEEE TPAMI 40(12), 2018 (arXiv 1611.01353).")
    display = "Information Dropout"
    hparams = {
        "beta": Hparam(3.0, "weight of the KL term (divided by N_train)", at_least(0)),
        "max_alpha": Hparam(0.7, "largest std of the log-noise", at_least(0, strict=True)),
        "head": Hparam("conv3x3", "alpha head: conv3x3 (reference shape) | conv1x1 (cheaper)", one_of(*HEADS)),
        "where": Hparam("stages", "stages (last block of each stage) | blocks (every block site)", one_of(*WHERE)),
        "bn_batches": Hparam(50, "training batches for BN re-estimation before each evaluation (0: off)", at_least(0, integer=True)),
    }

    def __init__(self, ctx: RunContext, **hp: Any):
        super().__init__(ctx, **hp)
        self.noisy: list[InformationDropout] = []

    @classmethod
    def check(cls, model: nn.Module, ctx: RunContext) -> None:
        if not _sites(model, "blocks"):
            raise IncompatibleError(f"info_dropout: {ctx.model_name} has no block sites (conv feature maps)")

    def attach(self, model: nn.Module) -> None:
        from mpbench.sites import insert

        for s in _sites(model, self.hp["where"]):
            m = InformationDropout(s.channels, float(self.hp["max_alpha"]), 1.0, self.hp["head"])
            insert(model, s.name, m, key="info_dropout")
            self.noisy.append(m)
            self.chosen_sites.append(s.name)

    def penalty(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                logits: torch.Tensor) -> torch.Tensor | None:
        kls = [m.kl for m in self.noisy if m.kl is not None]
        if not kls:
            return None
        return float(self.hp["beta"]) * torch.stack(kls).sum() / max(int(self.ctx.num_train), 1)

    def end_forward(self) -> None:
        for m in self.noisy:
            m.kl = None

    @contextlib.contextmanager
    def deterministic(self) -> Iterator[None]:
        prev = [m.noise_on for m in self.noisy]
        for m in self.noisy:
            m.noise_on = False
        try:
            yield
        finally:
            for m, p in zip(self.noisy, prev):
                m.noise_on = p

    @torch.no_grad()
    def before_eval(self, model: nn.Module, train_batches: Callable[[], Iterator[torch.Tensor]]) -> None:
        n = int(self.hp["bn_batches"])
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if n <= 0 or not bns:
            return
        modes = {m: m.training for m in model.modules()}
        momenta = {m: m.momentum for m in bns}
        device = next(model.parameters()).device
        try:
            with self.deterministic():
                model.eval()                    # every other stochastic layer off
                for m in bns:
                    m.momentum = None           # cumulative moving average over the pass
                    m.train()
                for i, batch in enumerate(train_batches()):
                    if i >= n:
                        break
                    if i == 0:                  # reset only once a batch is there to re-estimate from
                        for m in bns:
                            m.reset_running_stats()
                    x = batch[0] if isinstance(batch, (tuple, list)) else batch
                    model(x.to(device))
        finally:
            for m, mode in modes.items():
                m.training = mode
            for m, mom in momenta.items():
                m.momentum = mom
            for m in self.noisy:
                m.kl = None
