"""MetaPerturb at meta-test time: a frozen, meta-learned perturbation function at every block output.

Also MetaPerturb's public face for the rest of mpbench: the perturbation function (:class:`PerturbFunction`, from
``_perturb.py``), phi files, its wiring into a network (:func:`attach_perturbation`, used by this regularizer, by
meta-training's learners and by ``mpbench bench metaperturb``) and, for results and tests, the CPU execution
(:func:`cpu_kernel`; :data:`native`, the native kernels' module) and the fast path's numerical helpers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from mpbench.errors import IncompatibleError, UsageError
from mpbench.hparams import at_least, optional
from mpbench.regularization import EvalProtocol, Hparam, Regularizer, RunContext, register_regularizer
from regularizers import _perturb_native as native
from regularizers._perturb import PHI_NUMEL, PHI_SHAPES, PerturbFunction, check_phi, load_phi_file
from regularizers._perturb_fast import expected_softplus, softplus_sigmoid, standard_normal

__all__ = ["MetaPerturb", "PerturbFunction", "PerturbSite", "Perturbation", "attach_perturbation", "PHI_NUMEL",
           "PHI_SHAPES", "check_phi", "load_phi_file", "default_channel_norm", "cpu_kernel", "native",
           "expected_softplus", "softplus_sigmoid", "standard_normal"]


class PerturbSite(nn.Module):
    """``out = fn(h, site=index, noise_coeff=self.c)`` at one insertion site.

    All sites share one :class:`PerturbFunction`; the first site's wrapper registers it as its submodule ``fn``
    (so ``state_dict()`` holds phi and the running statistics once, and ``.to()`` moves them), the others keep a
    plain reference (``copy.deepcopy`` of the model keeps the sharing).

    ``generator``: None = ``fn`` draws its own noise (from torch's default generator); a ``torch.Generator`` = the
    Gaussian draw is ``torch.randn`` from it, passed as ``eps`` (meta-training: one stream per task, the same
    numbers in every execution mode), and none is drawn in deterministic mode."""

    def __init__(self, fn: PerturbFunction, index: int, register: bool, generator: torch.Generator | None = None):
        super().__init__()
        if register:
            self.fn = fn
        else:
            self.__dict__["fn"] = fn
        self.__dict__["generator"] = generator
        self.index = int(index)
        self.c = 1.0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        fn, gen = self.fn, self.generator
        if gen is None:
            return fn(h, site=self.index, noise_coeff=self.c)
        eps = None if fn.deterministic else torch.randn(h.shape, generator=gen, device=h.device, dtype=h.dtype)
        return fn(h, site=self.index, noise_coeff=self.c, eps=eps)

    def extra_repr(self) -> str:
        return f"site={self.index}, noise_coeff={self.c:g}"


def default_channel_norm(channels: list[int]) -> int:
    """The release's channel normaliser: 64 for CIFAR ResNets, 512 for VGG9 and ImageNet-style ResNets, the width
    for ConvNet4/6; in every case the largest channel count among the perturbed layers, which is the rule mpbench
    applies to any network."""
    return max(channels)


@dataclass
class Perturbation:
    """MetaPerturb wired into a network by :func:`attach_perturbation`: the shared function, its wrappers and the
    names of their sites (both in forward order)."""

    fn: PerturbFunction
    wrappers: list[PerturbSite]
    sites: list[str]


def attach_perturbation(model: nn.Module, spatial_norm: float, *, owner: str, channel_norm: float | None = None,
                        phi: str | Path | Mapping[str, torch.Tensor] | PerturbFunction | None = None,
                        trainable: bool | None = False, impl: str = "fast", native: bool = True,
                        generator: torch.Generator | None = None) -> Perturbation:
    """Insert one shared :class:`PerturbFunction` at every ``"block"`` site of ``model`` (:mod:`mpbench.sites`,
    key ``"metaperturb"``; one :class:`PerturbSite` each, the first registering the function).

    - ``owner`` names the caller in the IncompatibleError raised when the model has no block sites;
    - ``channel_norm`` None = :func:`default_channel_norm` of the sites' channels; ``spatial_norm``: the input size;
    - ``phi``: a phi file (read with :func:`load_phi_file`), a phi state dict (copied), a PerturbFunction whose
      parameters become this function's own (:meth:`PerturbFunction.share_phi`: meta-training's one phi shared by
      every task's network), or None (the N(0, 0.01) initialisation: the benchmark);
    - ``trainable``: phi's ``requires_grad``; None leaves it as it is (a shared phi keeps its owner's setting);
    - ``impl``, ``native``: which execution runs (PerturbFunction's ``impl`` and ``native``);
    - ``generator``: the wrappers draw the noise from it (see :class:`PerturbSite`).

    The function is built after the sites are found and before anything is inserted; building it draws its
    initialisation (82 normals) from torch's default generator, whatever ``phi``."""
    from mpbench.sites import insert, list_sites

    sites = list_sites(model, "block")
    if not sites:
        raise IncompatibleError(f"{owner} has no block sites to perturb")
    source = "phi"
    if isinstance(phi, (str, Path)):
        source, phi = str(phi), load_phi_file(phi)
    channels = [s.channels for s in sites]
    fn = PerturbFunction(num_sites=len(sites), channel_norm=channel_norm or default_channel_norm(channels),
                         spatial_norm=spatial_norm, channels=channels, impl=impl)
    fn.native = bool(native)
    if isinstance(phi, PerturbFunction):
        fn.share_phi(phi)
    elif phi is not None:
        fn.load_phi(phi, source=source)
    if trainable is not None:
        fn.phi_trainable = trainable
    wrappers = []
    for i, s in enumerate(sites):
        w = PerturbSite(fn, i, register=(i == 0), generator=generator)
        insert(model, s.name, w, key="metaperturb")
        wrappers.append(w)
    return Perturbation(fn, wrappers, [s.name for s in sites])


def cpu_kernel() -> str:
    """Which execution of the fast path runs on the CPU, as results and benchmarks record it: ``native`` (the
    fused C kernels, whose Gaussian stream is not torch.randn's) or ``pytorch (<why not native>)``."""
    return native.describe()


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
    display = "MetaPerturb"
    graph_safe = False      # noise coefficient c: a Python float annealed per step (a graph would freeze it)
    requires = ("metatrain",)
    hparams = {
        "phi": Hparam(None, "phi file or asset name (e.g. metaperturb_official); null = the run's metatrain artifact"),
        "channel_norm": Hparam(None, "channel normaliser of the scale function; null = widest perturbed layer",
                               optional(at_least(0, strict=True))),
        "spatial_norm": Hparam(None, "spatial normaliser of the scale function; null = input image size",
                               optional(at_least(0, strict=True))),
        "anneal": Hparam(0.4, "fraction of the steps over which the noise coefficient ramps 0 -> 1 (0 = none)",
                         at_least(0)),
        "eval_passes": Hparam(5, "stochastic passes averaged at periodic evaluations", at_least(1, integer=True)),
        "final_eval_passes": Hparam(100, "stochastic passes averaged at the final evaluation",
                                    at_least(1, integer=True)),
    }

    def __init__(self, ctx: RunContext, **hp: Any):
        super().__init__(ctx, **hp)
        self.requires = self.requires_for(self.hp)
        self.fn: PerturbFunction | None = None
        self.wrappers: list[PerturbSite] = []
        self.step = 0
        self.resolved: dict[str, Any] = {}

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
        """The phi file: ``phi`` (an asset name such as ``metaperturb_official``, stored by ``mpbench data prepare``
        under the default data root, or a path: absolute or relative to the working directory), else the metatrain
        artifact (a directory holding ``phi.pt``, or the file itself)."""
        if self.hp["phi"]:
            from mpbench.assets import resolve_stage_file

            return resolve_stage_file(str(self.hp["phi"]), None, None, key="reg.metaperturb.phi")
        art = self.ctx.artifacts.get("metatrain")
        if art is None:
            raise UsageError("metaperturb: no phi: set reg.metaperturb.phi to a phi file, or let the suite run the "
                             "metatrain stage")
        art = Path(art)
        return art / "phi.pt" if art.is_dir() else art

    def attach(self, model: nn.Module) -> None:
        path = self.phi_path()
        p = attach_perturbation(model, self.hp["spatial_norm"] or self.ctx.image_size, phi=path, trainable=False,
                                channel_norm=self.hp["channel_norm"], owner=f"metaperturb: {self.ctx.model_name}")
        self.fn = p.fn
        self.resolved = {"phi": str(path.resolve()), "channel_norm": p.fn.channel_norm,
                         "spatial_norm": p.fn.spatial_norm}
        self.wrappers.extend(p.wrappers)
        self.chosen_sites.extend(p.sites)
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

    def scalars(self) -> dict[str, float]:
        return {"noise_coeff": self.noise_coeff()}

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

    def transferred(self) -> int:
        """phi: the 82 meta-learned numbers (the per-site running statistics are learned on the target)."""
        return PHI_NUMEL

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["resolved"] = dict(self.resolved)
        out["eval_deterministic"] = "expected multiplier (Gauss-Hermite)"
        # which execution drew the noise on the CPU (the native kernels' generator is not torch.randn's stream)
        out["cpu_kernel"] = cpu_kernel()
        return out
