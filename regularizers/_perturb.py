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
from the spec, autograd does the rest) and the default fast one (``impl="fast"``), measured with
``python -m mpbench.bench metaperturb``:

- every shared 3x3 kernel is expanded to a (C, 1, 3, 3) depthwise conv (the 4 scale kernels as 4 depthwise convs:
  oneDNN runs those ~3x faster than one grouped conv with 4 outputs per group), computed in channels_last (~4x
  faster depthwise convs on CPU; the result comes back in the input's layout), the channel mean as one
  matrix-vector product and the one-channel 3x3 conv as a depthwise conv over the batch;
- softplus and sigmoid from one ``sigmoid`` and one ``log`` (``F.softplus`` is not vectorised on CPU);
- the Gaussian draw is PyTorch's own sampler (exactly N(0, 1) float32) written straight into channels_last;
- with phi frozen (meta-test), no graph through phi at all: :class:`_FrozenPerturb` computes the gradient with
  respect to ``h`` by hand (adjoint convolutions = the same depthwise convs with flipped kernels, ReLU masks via
  ``threshold_backward``; the scale branch's gradient reduces to per-(image, channel) multiples of 4 maps
  precomputed in forward, see :func:`_scale_stats`), and the
  running statistics are updated under ``no_grad``;
- with phi trainable (meta-training) the same fast ops are differentiated by autograd.
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
GH_NODES = 20   # Gauss-Hermite nodes for the expected multiplier (deterministic mode)


# ---- the Gaussian draw ------------------------------------------------------------------------------------------

def standard_normal(shape: Sequence[int], like: torch.Tensor,
                    memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """i.i.d. N(0, 1) of ``shape`` (dtype and device of ``like``, in ``memory_format``), from PyTorch's own sampler
    (``normal_``: exactly torch.randn's distribution), filling the storage in order whatever the layout.

    (Splitting the draw over two generators on two threads halves its time in isolation, but inside a training
    step the second core is held by OpenMP's spinning worker and the split gained nothing: not done.)"""
    out = torch.empty(tuple(shape), dtype=like.dtype, device=like.device, memory_format=memory_format)
    out.as_strided((out.numel(),), (1,)).normal_()
    return out


# ---- elementwise helpers ------------------------------------------------------------------------------------------

SOFTPLUS_LINEAR = 80.0   # above this softplus(t) == t in float32


def _softplus_sigmoid(t: torch.Tensor, need_sigmoid: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(softplus(t), sigmoid(t)) from one sigmoid and one log: ``q = sigmoid(-t)``, ``softplus(t) = -log(q)``,
    ``sigmoid(t) = 1 - q``; ``q`` is taken at ``min(t, 80)`` (no underflow) and ``softplus = max(-log q, t)``, exact
    there since softplus(t) - t < 2e-35 for t > 80. Absolute error < 1e-7 everywhere; ~2x faster than
    ``F.softplus`` + ``torch.sigmoid`` on CPU (whose softplus is not vectorised)."""
    q = torch.neg(t).clamp_min_(-SOFTPLUS_LINEAR).sigmoid_()
    sig = torch.rsub(q, 1.0) if need_sigmoid else None
    z = q.log_().neg_()
    torch.maximum(z, t, out=z)
    return z, sig


def _softplus_fwd(t: torch.Tensor) -> torch.Tensor:
    return _softplus_sigmoid(t, need_sigmoid=False)[0]


class _Softplus(torch.autograd.Function):
    """softplus with the fast forward and the exact derivative sigmoid(t)."""

    @staticmethod
    def forward(ctx, t):
        ctx.save_for_backward(t)
        return _softplus_fwd(t)

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad * torch.sigmoid(t)


def _gauss_hermite(n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    x, w = np.polynomial.hermite.hermgauss(n)
    return (torch.as_tensor(x * math.sqrt(2.0), dtype=like.dtype, device=like.device),
            torch.as_tensor(w / math.sqrt(math.pi), dtype=like.dtype, device=like.device))


def expected_softplus(alpha: torch.Tensor, nodes: int = GH_NODES) -> torch.Tensor:
    """E[softplus(alpha + eps)], eps ~ N(0, 1), by Gauss-Hermite quadrature (error < 1e-6 for ``nodes=20``);
    differentiable in alpha."""
    x, w = _gauss_hermite(nodes, alpha)
    if torch.is_grad_enabled() and alpha.requires_grad:
        return sum(wi * _Softplus.apply(alpha + xi) for xi, wi in zip(x.tolist(), w.tolist()))
    out = torch.zeros_like(alpha)
    for xi, wi in zip(x.tolist(), w.tolist()):
        out.add_(_softplus_fwd(alpha + xi), alpha=wi)
    return out


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
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
        self.num_sites = int(num_sites)
        self.channel_norm = float(channel_norm)
        self.spatial_norm = float(spatial_norm)
        self.momentum = float(momentum)
        self.clip = None if clip is None else float(clip)
        self.release_var_factor = bool(release_var_factor)
        self.impl = impl
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

    @torch.no_grad()
    def _update_stats(self, rm: torch.Tensor, rv: torch.Tensor, m: torch.Tensor, v: torch.Tensor, B: int) -> None:
        factor = B / (B - 1) if self.release_var_factor else 1.0
        rm.mul_(1.0 - self.momentum).add_(m.detach().to(rm.dtype), alpha=self.momentum)
        rv.mul_(1.0 - self.momentum).add_(v.detach().to(rv.dtype), alpha=self.momentum * factor)

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
        return self._fast_forward(h, site, noise_coeff, eps)

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
        if self.training:
            m = g.mean(dim=0)
            v = g.var(dim=0)                                             # unbiased
            self._update_stats(running_mean, running_var, m, v, B)
        else:
            m, v = running_mean.to(h.dtype), running_var.to(h.dtype)
        feats = torch.cat([m, v, torch.full((C, 1), C / self.channel_norm, dtype=m.dtype, device=m.device),
                           torch.full((C, 1), H / self.spatial_norm, dtype=m.dtype, device=m.device)], dim=1)
        s = torch.sigmoid(self.fc(feats)).view(1, C, 1, 1)
        out = h * ((s * z - 1) * noise_coeff + 1)
        if self.clip is not None:
            out = torch.clamp(out, max=self.clip)
        return out

    # ---- fast path --------------------------------------------------------------------------------------------------
    def _weights(self, C: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        dt = like.dtype
        return {
            "w1": self.phi_1.w_identity.to(dt).expand(C, 1, 3, 3),
            "a1": self.phi_1.w_all.to(dt),
            "w2": self.phi_2.w_identity.to(dt).expand(C, 1, 3, 3),
            "a2": self.phi_2.w_all.to(dt),
            "k": [self.kernel[k:k + 1].to(dt).expand(C, 1, 3, 3) for k in range(H_DIM)],
            "fc": self.fc.weight.to(dt),
        }

    def _scale_input(self, m: torch.Tensor, v: torch.Tensor, C: int, H: int) -> torch.Tensor:
        return torch.cat([m, v, m.new_full((C, 1), C / self.channel_norm), m.new_full((C, 1), H / self.spatial_norm)],
                         dim=1)

    def _fast_forward(self, h: torch.Tensor, site: int, noise_coeff: float,
                      eps: torch.Tensor | None) -> torch.Tensor:
        B, C, H, W = h.shape
        rm, rv = self._stats_for(site, C, h)
        if eps is None and not self.deterministic:
            eps = standard_normal(h.shape, h, memory_format=CL)
        grad = torch.is_grad_enabled()
        if grad and (self.phi_trainable or (self.deterministic and h.requires_grad)):
            return self._fast_autograd(h, rm, rv, float(noise_coeff), eps)
        with torch.no_grad():
            w = self._weights(C, h)
            hc = _to_cl(h.detach())
            if self.training:
                g, masks = _scale_stats(hc, w["k"], with_grad_maps=grad and h.requires_grad)
                m, v = g.mean(dim=0), g.var(dim=0)
                self._update_stats(rm, rv, m, v, B)
            else:
                g, masks = None, None
                m, v = rm.to(h.dtype), rv.to(h.dtype)
            s = torch.sigmoid(self._scale_input(m, v, C, H) @ w["fc"].t()).view(C)
            if eps is not None:
                eps = _to_cl(eps)
        h_is_cl = h.is_contiguous(memory_format=CL) and not h.is_contiguous()
        if grad and h.requires_grad:
            return _FrozenPerturb.apply(h, hc, eps, s, g, m, masks, w, float(noise_coeff), self.clip, self.training)
        with torch.no_grad():
            out = _frozen_forward(hc, eps, s, w, float(noise_coeff), self.clip, self.deterministic)[0]
            return _like_input(out, h_is_cl)

    def _fast_autograd(self, h: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor, c: float,
                       eps: torch.Tensor | None) -> torch.Tensor:
        """The fast ops (channels_last, depthwise convs, fast softplus), differentiated by autograd: used when phi
        trains (meta-training) and for gradients in deterministic mode."""
        B, C, H, W = h.shape
        w = self._weights(C, h)
        h_is_cl = h.is_contiguous(memory_format=CL) and not h.is_contiguous()
        hc = _to_cl(h)
        r = F.relu(_dw(hc, w["w1"]) + _conv1(_chan_sum(hc, 1.0 / C), w["a1"]))
        alpha = _dw(r, w["w2"]) + _conv1(_chan_sum(r, 1.0 / C), w["a2"])
        z = expected_softplus(alpha) if self.deterministic else _Softplus.apply(alpha + _to_cl(eps))
        if self.training:
            g = torch.stack([F.relu(_dw(hc, k)).mean(dim=(2, 3)) for k in w["k"]], dim=2)
            m, v = g.mean(dim=0), g.var(dim=0)
            self._update_stats(rm, rv, m, v, B)
        else:
            m, v = rm.to(h.dtype), rv.to(h.dtype)
        s = torch.sigmoid(self._scale_input(m, v, C, H) @ w["fc"].t()).view(1, C, 1, 1)
        out = hc * ((s * z - 1) * c + 1)
        if self.clip is not None:
            out = torch.clamp(out, max=self.clip)
        return _like_input(out, h_is_cl)

    def extra_repr(self) -> str:
        return (f"num_sites={self.num_sites}, channel_norm={self.channel_norm:g}, spatial_norm={self.spatial_norm:g}, "
                f"momentum={self.momentum:g}, clip={self.clip}, impl={self.impl}")


# ---- frozen-phi fast path: forward and hand-written backward ---------------------------------------------------------

def _dw(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, padding=1, groups=x.shape[1])


def _conv1(m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """3x3 convolution (padding 1) of a one-channel map (B, 1, H, W) with ``w`` (1, 1, 3, 3): run as a depthwise
    conv over the batch, (1, B, H, W), which oneDNN does ~3x faster on CPU than a 1-channel conv."""
    B, _, H, W = m.shape
    if m.device.type != "cpu":
        return F.conv2d(m, w, padding=1)
    return F.conv2d(m.reshape(1, B, H, W), w.expand(B, 1, 3, 3), padding=1, groups=B).view(B, 1, H, W)


def _dw_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Transpose of ``_dw`` (stride 1, padding 1): the same depthwise conv with the kernel rotated by 180 degrees."""
    return F.conv2d(x, w.flip(-1, -2), padding=1, groups=x.shape[1])


CL = torch.channels_last


def _to_cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CL)


def _like_input(x: torch.Tensor, h_is_cl: bool) -> torch.Tensor:
    """``x`` (channels_last) in the memory format of the layer's input: the perturbation changes no layout."""
    return x if h_is_cl else x.contiguous()


def _scale_stats(hc: torch.Tensor, kernels: list[torch.Tensor], with_grad_maps: bool):
    """g (B, C, 4) = spatial mean of relu(y_k), y_k = depthwise(h; kernel_k); with ``with_grad_maps`` also the 4
    maps ``M_k = depthwise^T(1[y_k > 0]; kernel_k)``, so that backward needs no convolution for the scale branch.

    Why: dL/dy_k[b, c] = gamma_k[b, c] 1[y_k[b, c] > 0] / (H W) with gamma_k constant over the map (it comes from
    the batch statistics of g), so dL/dh = sum_k gamma_k[b, c] / (H W) * M_k[b, c] exactly (linearity). ``M_k``
    is computed here while ``y_k`` is in cache, instead of storing or recomputing ``y_k`` for backward."""
    gs, maps = [], []
    for k in kernels:
        y = _dw(hc, k).clamp_min_(0.0)
        gs.append(y.mean(dim=(2, 3)))
        if with_grad_maps:
            maps.append(_dw_t(y.sign_(), k))          # y >= 0: sign(y) is the ReLU mask 1[y > 0]
    return torch.stack(gs, dim=2), (maps if with_grad_maps else None)


def _chan_sum(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * x.sum(1, keepdim=True)``; for channels_last ``x`` on CPU as one matrix-vector product (2x faster)."""
    B, C, H, W = x.shape
    if x.is_contiguous(memory_format=CL) and x.device.type == "cpu":
        v = torch.full((C, 1), scale, dtype=x.dtype, device=x.device)
        return (x.permute(0, 2, 3, 1).reshape(-1, C) @ v).view(B, H, W, 1).permute(0, 3, 1, 2)
    return x.sum(1, keepdim=True) * scale


def _equivariant(x: torch.Tensor, w_id: torch.Tensor, w_all: torch.Tensor) -> torch.Tensor:
    """E(x) = depthwise(x; w_id expanded) + conv(mean_c x; w_all) broadcast over channels."""
    return _dw(x, w_id).add_(_conv1(_chan_sum(x, 1.0 / x.shape[1]), w_all))


def _equivariant_t(x: torch.Tensor, w_id: torch.Tensor, w_all: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`_equivariant`."""
    return _dw_t(x, w_id).add_(_conv1(_chan_sum(x, 1.0 / x.shape[1]), w_all.flip(-1, -2)))


def _noise_alpha(hc: torch.Tensor, w: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, r): alpha = E2(r), r = relu(E1(h)); channels_last in, channels_last out."""
    r = _equivariant(hc, w["w1"], w["a1"]).clamp_min_(0.0)
    return _equivariant(r, w["w2"], w["a2"]), r


def _multiplier(z: torch.Tensor, s: torch.Tensor, c: float) -> torch.Tensor:
    """(s * z - 1) * c + 1 = z * (c s) + (1 - c)."""
    mult = z * (c * s).view(1, -1, 1, 1)
    return mult.add_(1.0 - c) if c != 1.0 else mult


def _frozen_forward(hc, eps, s, w, c, clip, deterministic, for_grad=False):
    """Channels_last forward with frozen phi. Returns (out, z, sigcs, r, mult, clipped) with sigcs = c s
    sigmoid(alpha + eps) (only ``for_grad``), r = relu(E1(h)) and mult = (s z - 1) c + 1."""
    t, r = _noise_alpha(hc, w)
    cs = (c * s).view(1, -1, 1, 1)
    sigcs = None
    if deterministic:
        z = expected_softplus(t)
    else:
        t.add_(eps)
        # softplus(t) = -log(q), sigmoid(t) = 1 - q with q = sigmoid(-min(t, 80)): see _softplus_sigmoid
        q = torch.neg(t).clamp_min_(-SOFTPLUS_LINEAR).sigmoid_()
        if for_grad:
            sigcs = torch.addcmul(cs, q, cs, value=-1.0)      # c s (1 - q)
        z = q.log_().neg_()
        torch.maximum(z, t, out=z)
    mult = z * cs
    if c != 1.0:
        mult.add_(1.0 - c)
    out = mult * hc if for_grad else mult.mul_(hc)
    clipped = False
    if clip is not None:
        # on the CPU, look before clamping so that backward can skip the mask when nothing was clipped
        clipped = out.device.type != "cpu" or bool(out.amax() > clip)
        if clipped:
            out.clamp_(max=clip)
    return out, z, sigcs, r, mult, clipped


class _FrozenPerturb(torch.autograd.Function):
    """Perturbation with phi frozen: gradient with respect to h only (through the noise branch, and in training
    also through the batch statistics of the scale function). Stochastic mode only. Works in channels_last
    internally (depthwise convolutions are ~4x faster there on CPU) and returns the layout of ``h``."""

    @staticmethod
    def forward(ctx, h, hc, eps, s, g, m, masks, w, c, clip, training):
        out, z, sigcs, r, mult, clipped = _frozen_forward(hc, eps, s, w, c, clip, False, for_grad=True)
        ctx.c, ctx.clip, ctx.w, ctx.masks, ctx.training = c, clip, w, masks, training
        ctx.clipped = clipped
        ctx.h_is_cl = h.is_contiguous(memory_format=CL) and not h.is_contiguous()
        ctx.save_for_backward(hc, z, sigcs, r, mult, s, g, m)
        return _like_input(out, ctx.h_is_cl)

    @staticmethod
    def backward(ctx, grad):
        hc, z, sigcs, r, mult, s, g, m = ctx.saved_tensors
        c, w = ctx.c, ctx.w
        B, C, H, W = hc.shape
        grad = _to_cl(grad)
        if ctx.clipped:
            grad = grad.masked_fill(mult * hc > ctx.clip, 0.0)
        gh = grad * hc
        dh = mult * grad                                       # direct term: d(h * mult)/dh = mult
        dt = gh * sigcs                                        # dz = grad * h * c s; dt = dz * sigmoid(t)
        dr = _equivariant_t(dt, w["w2"], w["a2"])
        du = torch.ops.aten.threshold_backward(dr, r, 0.0)    # relu mask of E1
        dh.add_(_equivariant_t(du, w["w1"], w["a1"]))
        del dt, dr, du
        # scale branch (training: s depends on h through the batch statistics of g)
        if ctx.training and ctx.masks is not None:
            ds = gh.mul_(z).sum(dim=(0, 2, 3)).mul_(c)                      # (C,)
            dpre = ds * s * (1 - s)                                         # (C,)
            dfeat = dpre[:, None] * w["fc"]                                 # (C, 10)
            dm, dv = dfeat[:, :H_DIM], dfeat[:, H_DIM:2 * H_DIM]
            dg = (dm / B + dv * (2.0 / (B - 1)) * (g - m)) / (H * W)        # (B, C, 4)
            for k, mk in enumerate(ctx.masks):      # mk = depthwise^T(1[y_k > 0]; kernel_k), see _scale_stats
                dh.addcmul_(mk, dg[:, :, k].contiguous().view(B, C, 1, 1))
        return _like_input(dh, ctx.h_is_cl), None, None, None, None, None, None, None, None, None, None


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
