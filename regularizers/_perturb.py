"""MetaPerturb's perturbation function (Ryu, Shin, Lee, Hwang, NeurIPS 2020, arXiv 2006.07540).

Implemented from ``shared/design/metaperturb.md`` section 1. One :class:`PerturbFunction` is shared by every
perturbed layer ("site") of a network; it holds the 82 meta-learned floats ("phi") as parameters and, per site,
running statistics of its scale function as buffers.

For a feature map ``h`` of shape (B, C, H, W) at site ``i``:

- channel-equivariant op: ``E(x) = depthwise3x3(x; w_identity shared by all channels) + conv3x3(mean_c x; w_all)``
  broadcast over channels (padding 1);
- noise: ``alpha = E2(relu(E1(h)))``, ``z = softplus(alpha + eps)``, ``eps ~ N(0, 1)`` of h's shape;
- scale: ``g[b, c, k] = spatial_mean(relu(conv3x3(h[b, c]; kernel[k])))`` (padding 1), (B, C, 4); in training
  ``m = mean_B g``, ``v = var_B g`` (unbiased) and site i's running stats are updated with ``momentum``; in
  evaluation ``m, v`` are site i's running stats; ``s[c] = sigmoid(fc([m[c], v[c], C / channel_norm,
  H / spatial_norm]))``;
- output: ``h * ((s * z - 1) * c + 1)`` clamped above at ``clip``; ``c`` is the noise coefficient (annealing).

Two implementations of the same function: :meth:`PerturbFunction._reference_forward` (direct, readable, straight
from the spec, autograd does the rest) and the default fast one (``impl="fast"``) in
:mod:`regularizers._perturb_fast`, on the CPU :mod:`regularizers._perturb_native` and on CUDA
:mod:`regularizers._perturb_triton` (``impl="triton"`` forces it; how each is made fast is described there). Under
autocast the reference runs.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mpbench.errors import UsageError
from regularizers._perturb_fast import expected_softplus, fast_forward

H_DIM = 4
PHI_SHAPES: "OrderedDict[str, tuple[int, ...]]" = OrderedDict([
    ("kernel", (H_DIM, 1, 3, 3)),
    ("phi_1.w_identity", (1, 1, 3, 3)),
    ("phi_1.w_all", (1, 1, 3, 3)),
    ("phi_2.w_identity", (1, 1, 3, 3)),
    ("phi_2.w_all", (1, 1, 3, 3)),
    ("fc.weight", (1, 2 * H_DIM + 2)),
])
PHI_NUMEL = sum(math.prod(s) for s in PHI_SHAPES.values())   # 82
INIT_STD = 0.01


# ---- the module ---------------------------------------------------------------------------------------------------

class ChannelEquivariantOp(nn.Module):
    """``E(x) = conv3x3(x_c; w_identity) for every channel c + conv3x3(mean_c x; w_all)`` broadcast (padding 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.w_identity = nn.Parameter(torch.empty(1, 1, 3, 3))
        self.w_all = nn.Parameter(torch.empty(1, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # the reference form
        C = x.shape[1]
        ident = F.conv2d(x, self.w_identity.expand(C, 1, 3, 3), padding=1, groups=C)
        shared = F.conv2d(x.mean(dim=1, keepdim=True), self.w_all, padding=1)
        return ident + shared


class PerturbFunction(nn.Module):
    """MetaPerturb's perturbation function with per-site running statistics.

    Parameters ("phi", 82 floats, keys exactly as the authors' released file): ``kernel`` (4, 1, 3, 3),
    ``phi_1.w_identity``, ``phi_1.w_all``, ``phi_2.w_identity``, ``phi_2.w_all`` (each 1, 1, 3, 3), ``fc.weight``
    (1, 10), no bias. Initialisation "N(0, 0.01)" is read as **standard deviation 0.01** (``nn.init.normal_(p, 0,
    0.01)``, PyTorch's (mean, std) convention, which is what the release calls).

    Buffers (not phi): ``running_mean_<i>`` (C_i, 4) and ``running_var_<i>`` (C_i, 4) for every site i, initialised
    to 0 / 1. The statistics are per channel (``g`` is (B, C, 4); its batch mean and variance are (C, 4)), so each
    site has its own shape; pass ``channels`` (one per site) to allocate them now, else each is allocated at the
    first call of its site (and :meth:`load_state_dict` resizes unallocated ones to the stored shape).

    Variance: the batch variance used for ``s`` in training is the unbiased one (``var(dim=0)``, divisor B - 1). The
    release multiplies it by B / (B - 1) *once more* before the running-variance update; with
    ``release_var_factor=True`` (default) mpbench does the same, so the released phi meets the same running
    statistics at evaluation as in the authors' code (at B = 128 the factor is 1.008). ``release_var_factor=False``
    updates with the plain unbiased variance, as BatchNorm does.

    Training needs B >= 2 (a batch variance); evaluation uses the running statistics and accepts any B.

    Call ``fn(h, site=i, noise_coeff=c, eps=None)``; ``eps`` (h's shape) injects the Gaussian draw. With
    ``deterministic=True`` (set by the regularizer's ``deterministic()`` context) ``z`` is replaced by its
    expectation ``E[softplus(alpha + eps)]`` (Gauss-Hermite quadrature), i.e. the output is ``h`` times the
    expected multiplier, and no noise is drawn.
    """

    def __init__(self, num_sites: int = 1, channel_norm: float = 64.0, spatial_norm: float = 32.0,
                 momentum: float = 0.1, clip: float | None = 100.0, channels: Sequence[int] | None = None,
                 release_var_factor: bool = True, impl: str = "fast", phi_trainable: bool = True):
        super().__init__()
        if num_sites < 1:
            raise ValueError(f"num_sites must be >= 1, got {num_sites}")
        if channels is not None and len(channels) != num_sites:
            raise ValueError(f"channels has {len(channels)} entries for {num_sites} sites")
        if impl not in ("fast", "reference", "triton"):
            raise ValueError(f"impl must be 'fast', 'reference' or 'triton', got {impl!r}")
        self.num_sites = int(num_sites)
        self.channel_norm = float(channel_norm)
        self.spatial_norm = float(spatial_norm)
        self.momentum = float(momentum)
        self.clip = None if clip is None else float(clip)
        self.release_var_factor = bool(release_var_factor)
        self.impl = impl
        self.native = True          # frozen phi, float32: the fused kernels (native C on CPU, Triton on CUDA)
        self.deterministic = False
        self.kernel = nn.Parameter(torch.empty(H_DIM, 1, 3, 3))
        self.phi_1 = ChannelEquivariantOp()
        self.phi_2 = ChannelEquivariantOp()
        self.fc = nn.Linear(2 * H_DIM + 2, 1, bias=False)
        for p in self.parameters():
            nn.init.normal_(p, 0.0, INIT_STD)
        for i in range(self.num_sites):
            c = 0 if channels is None else int(channels[i])
            self.register_buffer(f"running_mean_{i}", torch.zeros(c, H_DIM))
            self.register_buffer(f"running_var_{i}", torch.ones(c, H_DIM))
        self.phi_trainable = phi_trainable

    # ---- phi ------------------------------------------------------------------------------------------------------
    @property
    def phi_trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    @phi_trainable.setter
    def phi_trainable(self, value: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(bool(value))

    def phi_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """The 82 meta-learned floats under the released key names (no running statistics)."""
        params = dict(self.named_parameters())
        return OrderedDict((k, params[k].detach().clone()) for k in PHI_SHAPES)

    def load_phi(self, state: Mapping[str, torch.Tensor], source: str = "phi") -> None:
        """Copy phi from ``state`` (released key names); a wrong key, shape or value is a UsageError."""
        state = check_phi(state, source)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k in PHI_SHAPES:
                params[k].copy_(state[k].to(params[k].device, params[k].dtype))

    def share_phi(self, other: "PerturbFunction") -> None:
        """Make this function's six parameters the very Parameter objects of ``other`` (meta-training: every task's
        network perturbs with the one phi being learned); the running statistics stay this function's own."""
        for name, p in other.named_parameters():
            mod, _, attr = name.rpartition(".")
            setattr(self.get_submodule(mod) if mod else self, attr, p)

    def save_phi(self, path: str | Path) -> None:
        """Write phi in the released format (a plain state dict of the 6 tensors, loadable with weights_only)."""
        torch.save(self.phi_state_dict(), str(path))

    @classmethod
    def from_official(cls, path: str | Path, channel_norm: float = 64.0, spatial_norm: float = 32.0,
                      num_sites: int = 1, **kwargs: Any) -> "PerturbFunction":
        """A PerturbFunction holding the phi stored at ``path`` (the authors' released file or one saved by
        :meth:`save_phi`)."""
        fn = cls(num_sites=num_sites, channel_norm=channel_norm, spatial_norm=spatial_norm, **kwargs)
        fn.load_phi(load_phi_file(path), source=str(path))
        return fn

    # ---- running statistics -----------------------------------------------------------------------------------------
    def running_stats(self, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"running_mean_{site}"), getattr(self, f"running_var_{site}")

    def _stats_for(self, site: int, C: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= site < self.num_sites:
            raise IndexError(f"site {site} out of range: this PerturbFunction has {self.num_sites} sites")
        rm, rv = self.running_stats(site)
        if rm.numel() == 0:       # allocate at the first call of this site
            rm = torch.zeros(C, H_DIM, device=like.device, dtype=rm.dtype)
            rv = torch.ones(C, H_DIM, device=like.device, dtype=rv.dtype)
            setattr(self, f"running_mean_{site}", rm)
            setattr(self, f"running_var_{site}", rv)
        elif rm.shape[0] != C:
            raise ValueError(f"site {site} has running statistics for {rm.shape[0]} channels, got a {C}-channel "
                             f"input: use one site index per layer")
        return rm, rv

    def _moments(self, g: torch.Tensor | None, rm: torch.Tensor, rv: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, v) (C, 4) for the scale function: in training the batch mean and unbiased variance of ``g`` (B, C, 4),
        and the running statistics ``rm, rv`` are updated; in evaluation ``rm, rv`` (``g`` is not needed)."""
        if not self.training:
            return rm.to(dtype), rv.to(dtype)
        m, v = g.mean(dim=0), g.var(dim=0)
        B = g.shape[0]
        factor = B / (B - 1) if self.release_var_factor else 1.0
        with torch.no_grad():
            rm.mul_(1.0 - self.momentum).add_(m.detach().to(rm.dtype), alpha=self.momentum)
            rv.mul_(1.0 - self.momentum).add_(v.detach().to(rv.dtype), alpha=self.momentum * factor)
        return m, v

    def _scale_input(self, m: torch.Tensor, v: torch.Tensor, C: int, H: int) -> torch.Tensor:
        """The scale function's input (C, 10): ``[m, v, C / channel_norm, H / spatial_norm]``."""
        return torch.cat([m, v, m.new_full((C, 1), C / self.channel_norm), m.new_full((C, 1), H / self.spatial_norm)],
                         dim=1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for i in range(self.num_sites):
            for name in (f"running_mean_{i}", f"running_var_{i}"):
                key = prefix + name
                cur = getattr(self, name)
                if key in state_dict and cur.numel() == 0 and state_dict[key].shape != cur.shape:
                    setattr(self, name, torch.empty(state_dict[key].shape, dtype=cur.dtype, device=cur.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---- forward ----------------------------------------------------------------------------------------------------
    def forward(self, h: torch.Tensor, site: int = 0, noise_coeff: float = 1.0,
                eps: torch.Tensor | None = None) -> torch.Tensor:
        if h.dim() != 4:
            raise ValueError(f"PerturbFunction expects a (B, C, H, W) feature map, got shape {tuple(h.shape)}")
        if self.training and h.shape[0] < 2:
            raise ValueError("PerturbFunction in training mode needs a batch of >= 2 (it uses the batch variance)")
        if eps is not None and eps.shape != h.shape:
            raise ValueError(f"eps has shape {tuple(eps.shape)}, expected {tuple(h.shape)}")
        if self.impl == "reference" or torch.is_autocast_enabled(h.device.type):
            return self._reference_forward(h, site, noise_coeff, eps)     # (the fast path assumes one dtype)
        return fast_forward(self, h, site, noise_coeff, eps)

    def _reference_forward(self, h: torch.Tensor, site: int = 0, noise_coeff: float = 1.0,
                           eps: torch.Tensor | None = None) -> torch.Tensor:
        """The spec, written out directly; autograd differentiates it."""
        B, C, H, W = h.shape
        running_mean, running_var = self._stats_for(site, C, h)
        # noise generator
        alpha = self.phi_2(F.relu(self.phi_1(h)))
        if self.deterministic:
            z = expected_softplus(alpha)
        else:
            if eps is None:
                eps = torch.randn_like(h)
            z = F.softplus(alpha + eps)
        # scale function: g[b, c, k] = spatial mean of relu(conv3x3(h[b, c]; kernel[k]))
        per_channel_kernels = self.kernel.repeat(C, 1, 1, 1)            # row c * 4 + k = kernel[k]
        g = F.relu(F.conv2d(h, per_channel_kernels, padding=1, groups=C)).mean(dim=(2, 3)).view(B, C, H_DIM)
        m, v = self._moments(g, running_mean, running_var, h.dtype)     # batch (unbiased var) or running stats
        s = torch.sigmoid(self.fc(self._scale_input(m, v, C, H))).view(1, C, 1, 1)
        out = h * ((s * z - 1) * noise_coeff + 1)
        if self.clip is not None:
            out = torch.clamp(out, max=self.clip)
        return out

    def extra_repr(self) -> str:
        return (f"num_sites={self.num_sites}, channel_norm={self.channel_norm:g}, spatial_norm={self.spatial_norm:g}, "
                f"momentum={self.momentum:g}, clip={self.clip}, impl={self.impl}")


# ---- phi files ------------------------------------------------------------------------------------------------------

def check_phi(state: Any, source: str = "phi") -> Mapping[str, torch.Tensor]:
    """Validate a phi state dict: exactly the released keys, shapes and finite values (one-line UsageError)."""
    if isinstance(state, Mapping) and "phi" in state and isinstance(state["phi"], Mapping):
        state = state["phi"]
    if not isinstance(state, Mapping):
        raise UsageError(f"{source}: not a MetaPerturb phi (expected a state dict of {len(PHI_SHAPES)} tensors, got "
                         f"{type(state).__name__})")
    missing = [k for k in PHI_SHAPES if k not in state]
    extra = [k for k in state if k not in PHI_SHAPES]
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(map(str, extra))}"]
                                                                           if extra else [])
        raise UsageError(f"{source}: not a MetaPerturb phi ({'; '.join(parts)})")
    for k, shape in PHI_SHAPES.items():
        v = state[k]
        if not isinstance(v, torch.Tensor):
            raise UsageError(f"{source}: {k} is a {type(v).__name__}, expected a tensor of shape {shape}")
        if tuple(v.shape) != shape:
            raise UsageError(f"{source}: {k} has shape {tuple(v.shape)}, expected {shape}")
        if not torch.isfinite(v).all():
            raise UsageError(f"{source}: {k} holds non-finite values")
    return state


def load_phi_file(path: str | Path) -> Mapping[str, torch.Tensor]:
    """Read and validate a phi file (the released format: a state dict, possibly legacy non-zip, possibly saved on a
    CUDA device) with ``weights_only=True``; every failure is a one-line UsageError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: MetaPerturb phi file not found")
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (corrupt, truncated, not a torch file, unsafe pickle)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"{p}: cannot read MetaPerturb phi ({type(e).__name__}{': ' + msg[:160] if msg else ''})"
                         ) from None
    return check_phi(state, str(p))
