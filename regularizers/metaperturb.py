"""MetaPerturb at meta-test time: a frozen, meta-learned perturbation function at every block output."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from mpbench.errors import IncompatibleError, UsageError
from mpbench.regularization import EvalProtocol, Hparam, Regularizer, RunContext, register_regularizer
from regularizers import _perturb_native as native
from regularizers._perturb import PHI_SHAPES, PerturbFunction, check_phi, load_phi_file
from regularizers._perturb_fast import standard_normal

__all__ = ["MetaPerturb", "PerturbFunction", "PerturbSite", "PHI_SHAPES", "check_phi", "load_phi_file",
           "standard_normal", "default_channel_norm"]


class PerturbSite(nn.Module):
    """``out = fn(h, site=index, noise_coeff=self.c)`` at one insertion site.

    All sites share one :class:`PerturbFunction`; the first site's wrapper registers it as its submodule ``fn``
    (so ``state_dict()`` holds phi and the running statistics once, and ``.to()`` moves them), the others keep a
    plain reference (``copy.deepcopy`` of the model keeps the sharing)."""

    def __init__(self, fn: PerturbFunction, index: int, register: bool):
        super().__init__()
        if register:
            self.fn = fn
        else:
            self.__dict__["fn"] = fn
        self.index = int(index)
        self.c = 1.0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h, site=self.index, noise_coeff=self.c)

    def extra_repr(self) -> str:
        return f"site={self.index}, noise_coeff={self.c:g}"


def default_channel_norm(channels: list[int]) -> int:
    """The release's channel normaliser: 64 for CIFAR ResNets, 512 for VGG9 and ImageNet-style ResNets, the width
    for ConvNet4/6; in every case the largest channel count among the perturbed layers, which is the rule mpbench
    applies to any network."""
    return max(channels)


@register_regularizer("metaperturb")
class MetaPerturb(Regularizer):
    """MetaPerturb (Ryu et al., NeurIPS 2020): meta-learned input-dependent multiplicative noise at block outputs.

    Meta-test stage of the method (``shared/design/metaperturb.md`` section 3): the perturbation function phi (82
    floats) is loaded from ``phi`` (a file, e.g. the authors' released ``metaperturb_official_tin_resnet20_750.pth``)
    or, when ``phi`` is null, from the run's ``metatrain`` artifact (``phi.pt``); phi is frozen (no gradient, not in
    the optimizer); the per-site running statistics of its scale function are buffers of the model that adapt on
    the target data. One PerturbFunction is shared by every "block" site (``mpbench.sites``: after the residual add
    and before the final ReLU of every residual block; after conv+BN and before ReLU in plain conv nets; never the
    stem). ``channel_norm`` null = the largest channel count among the sites (64 for CIFAR ResNets, 512 for VGG9 and
    ImageNet-style ResNets, the width of ConvNet4/6: the release's values); ``spatial_norm`` null = the input image
    size. Noise annealing: coefficient ``c = min(1, step / (anneal * steps))`` (0 = no annealing).

    Evaluation: the noise stays on; the softmax is averaged over ``eval_passes`` (periodic) and
    ``final_eval_passes`` (final) stochastic passes, as in the release. ``deterministic()`` replaces the random
    multiplier by its expectation, ``h * ((s * E[softplus(alpha + eps)] - 1) * c + 1)`` (Gauss-Hermite quadrature;
    the analogue of dropout's weight scaling), rather than removing the perturbation: every layer after a site, and
    its BatchNorm running statistics, was trained on perturbed activations whose mean multiplier ``s * E[z]`` is far
    from 1 (s is in (0, 1)), so the identity would evaluate a network that was never trained.
    """

    citation = ("Ryu, Shin, Lee, Hwang. MetaPerturb: Transferable Regularizer for Heterogeneous Tasks and "
                "Architectures. NeurIPS 2020 (arXiv 2006.07540).")
    requires = ("metatrain",)
    hparams = {
        "phi": Hparam(None, None, "phi file (e.g. the released checkpoint); null = the run's metatrain artifact"),
        "channel_norm": Hparam(None, None, "channel normaliser of the scale function; null = widest perturbed layer"),
        "spatial_norm": Hparam(None, None, "spatial normaliser of the scale function; null = input image size"),
        "anneal": Hparam(0.4, None, "fraction of the steps over which the noise coefficient ramps 0 -> 1"),
        "eval_passes": Hparam(5, None, "stochastic passes averaged at periodic evaluations"),
        "final_eval_passes": Hparam(100, None, "stochastic passes averaged at the final evaluation"),
    }

    def __init__(self, ctx: RunContext, **hp: Any):
        super().__init__(ctx, **hp)
        self.requires = self.requires_for(self.hp)
        self.fn: PerturbFunction | None = None
        self.wrappers: list[PerturbSite] = []
        self.step = 0
        self.resolved: dict[str, Any] = {}
        if float(self.hp["anneal"]) < 0:
            raise UsageError(f"reg.metaperturb.anneal={self.hp['anneal']} must be >= 0 (0 = no annealing)")
        for k in ("eval_passes", "final_eval_passes"):
            if int(self.hp[k]) < 1:
                raise UsageError(f"reg.metaperturb.{k}={self.hp[k]} must be >= 1")

    @classmethod
    def requires_for(cls, hp: dict[str, Any]) -> tuple[str, ...]:
        return () if hp.get("phi") else ("metatrain",)

    @classmethod
    def check(cls, model: nn.Module, ctx: RunContext) -> None:
        from mpbench.sites import list_sites

        if not list_sites(model, "block"):
            raise IncompatibleError(f"metaperturb: {ctx.model_name} has no block sites to perturb")

    # build ------------------------------------------------------------------------------------------------------
    def phi_path(self) -> Path:
        """The phi file: ``phi`` (a relative path is tried against the working directory, then the project root),
        else the metatrain artifact (a directory holding ``phi.pt``, or the file itself)."""
        if self.hp["phi"]:
            p = Path(str(self.hp["phi"])).expanduser()
            if not p.is_absolute() and not p.exists():
                root = Path(__file__).resolve().parents[1] / p
                if root.exists():
                    return root
            return p
        art = self.ctx.artifacts.get("metatrain")
        if art is None:
            raise UsageError("metaperturb: no phi: set reg.metaperturb.phi to a phi file, or let the suite run the "
                             "metatrain stage")
        art = Path(art)
        return art / "phi.pt" if art.is_dir() else art

    def attach(self, model: nn.Module) -> None:
        from mpbench.sites import insert, list_sites

        sites = list_sites(model, "block")
        if not sites:
            raise IncompatibleError(f"metaperturb: {self.ctx.model_name} has no block sites to perturb")
        path = self.phi_path()
        phi = load_phi_file(path)
        channels = [s.channels for s in sites]
        cn = self.hp["channel_norm"] or default_channel_norm(channels)
        sn = self.hp["spatial_norm"] or self.ctx.image_size
        self.fn = PerturbFunction(num_sites=len(sites), channel_norm=cn, spatial_norm=sn, channels=channels)
        self.fn.load_phi(phi, source=str(path))
        self.fn.phi_trainable = False
        self.resolved = {"phi": str(path.resolve()), "channel_norm": float(cn), "spatial_norm": float(sn)}
        for i, s in enumerate(sites):
            w = PerturbSite(self.fn, i, register=(i == 0))
            insert(model, s.name, w, key="metaperturb")
            self.wrappers.append(w)
            self.chosen_sites.append(s.name)
        self._set_coeff()

    def param_groups(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.fn is None:
            return groups
        phi = {id(p) for p in self.fn.parameters()}
        return [{**g, "params": [p for p in g["params"] if id(p) not in phi]} for g in groups]

    # training ---------------------------------------------------------------------------------------------------
    def noise_coeff(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        frac = float(self.hp["anneal"])
        if frac <= 0:
            return 1.0
        return min(1.0, max(step, 0) / (frac * max(int(self.ctx.total_steps), 1)))

    def _set_coeff(self) -> None:
        c = self.noise_coeff()
        for w in self.wrappers:
            w.c = c

    def begin_step(self, step: int) -> None:
        self.step = int(step)
        self._set_coeff()

    # evaluation -------------------------------------------------------------------------------------------------
    @property
    def eval_protocol(self) -> EvalProtocol:
        return EvalProtocol(int(self.hp["eval_passes"]), int(self.hp["final_eval_passes"]))

    @contextlib.contextmanager
    def deterministic(self) -> Iterator[None]:
        if self.fn is None:
            yield
            return
        before = self.fn.deterministic
        self.fn.deterministic = True
        try:
            yield
        finally:
            self.fn.deterministic = before

    # resume -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "noise_coeff": self.noise_coeff()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
        self._set_coeff()

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["resolved"] = dict(self.resolved)
        out["eval_deterministic"] = "expected multiplier (Gauss-Hermite)"
        # which execution drew the noise on the CPU (the native kernels' generator is not torch.randn's stream)
        out["cpu_kernel"] = native.describe()
        return out
