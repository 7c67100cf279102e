"""The fast execution of MetaPerturb's perturbation function (``PerturbFunction(impl="fast")``, the default).

With phi frozen, stochastic, on float32 CPU tensors, the native kernels of :mod:`regularizers._perturb_native` run
(where a C compiler builds them); on float32 CUDA tensors the Triton kernels of :mod:`regularizers._perturb_triton`
(the element-wise chain fused between cuDNN's convolutions; ``impl="triton"`` forces them) where triton runs;
everything else (float64, trainable phi, deterministic mode, no compiler or triton) runs the PyTorch execution
below (``PerturbFunction.native = False``: this execution on every device).

It computes the same math as :meth:`regularizers._perturb.PerturbFunction._reference_forward` (the spec written
out directly; ``tests/test_metaperturb.py`` compares the two, outputs and gradients), only faster, as measured
with ``python -m mpbench.bench metaperturb``:

- every shared 3x3 kernel is expanded to a (C, 1, 3, 3) depthwise conv (the 4 scale kernels as 4 depthwise convs:
  oneDNN runs those ~2-4x faster than one grouped conv with 4 or 5 outputs per group, in forward and adjoint),
  computed in channels_last (faster depthwise convs on CPU; the result comes back in the input's layout), the
  channel mean as one matrix-vector product and the one-channel 3x3 conv as a depthwise conv over the batch;
- with phi frozen (meta-test and evaluation) nothing builds a graph through phi and the elementwise work rides on
  the convolutions where oneDNN can fuse it (:func:`_dwc`, :func:`_dwc_acc`: relu, and an in-place sum into a
  buffer, the only binary post-op PyTorch actually runs fused); the kernels are prepared once per phi
  (:func:`_frozen_weights`). :class:`_FrozenPerturb` computes the gradient with respect to ``h`` by hand
  (adjoint convolutions = the same depthwise convs with rotated kernels, ReLU masks via ``threshold_backward``);
  the scale branch's whole gradient is one map P built in forward, each y_k used once while in cache
  (:func:`_frozen_scale`), so backward spends no convolution on it;
- softplus and sigmoid from one ``sigmoid`` and one ``log`` (``F.softplus`` is not vectorised on CPU): E2 yields
  -t = -(alpha + eps) directly, q = sigmoid(-t), z = -log q, sigmoid(t) = 1 - q (:func:`_frozen_noise`);
- the Gaussian draw is PyTorch's own sampler (exactly N(0, 1) float32) written straight into channels_last;
- with phi trainable (meta-training), or for gradients in deterministic mode, the same convolutions are
  differentiated by autograd (:func:`_autograd_forward`).

Deterministic mode's expected multiplier, ``E[softplus(alpha + eps)]`` by Gauss-Hermite quadrature
(:func:`expected_softplus`), is shared with the reference.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from regularizers import _perturb_native as native

if TYPE_CHECKING:
    from regularizers._perturb import PerturbFunction

CL = torch.channels_last
GH_NODES = 20            # Gauss-Hermite nodes for the expected multiplier (deterministic mode)
SOFTPLUS_LINEAR = 80.0   # above this softplus(t) == t in float32


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


# ---- softplus and sigmoid ---------------------------------------------------------------------------------------

def _sigmoid_neg(t: torch.Tensor) -> torch.Tensor:
    """``q = sigmoid(-min(t, 80))`` (no underflow): ``softplus(t) = -log(q)`` and ``sigmoid(t) = 1 - q``."""
    return torch.neg(t).clamp_min_(-SOFTPLUS_LINEAR).sigmoid_()


def _softplus_from(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """softplus(t) = max(-log q, t) from ``q = _sigmoid_neg(t)``, in q's storage; exact for t > 80 too, since
    softplus(t) - t < 2e-35 there."""
    z = q.log_().neg_()
    return torch.maximum(z, t, out=z)


def softplus_sigmoid(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softplus(t), sigmoid(t)) from one sigmoid and one log. Absolute error < 1e-7 everywhere; ~2x faster than
    ``F.softplus`` + ``torch.sigmoid`` on CPU (whose softplus is not vectorised)."""
    q = _sigmoid_neg(t)
    sig = torch.rsub(q, 1.0)
    return _softplus_from(q, t), sig


def _softplus_fwd(t: torch.Tensor) -> torch.Tensor:
    return _softplus_from(_sigmoid_neg(t), t)


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


# ---- layout and convolution helpers -----------------------------------------------------------------------------

def _to_cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CL)


def _is_cl(h: torch.Tensor) -> bool:
    """``h`` is channels_last and not also plain contiguous (e.g. 1x1 maps)."""
    return h.is_contiguous(memory_format=CL) and not h.is_contiguous()


def _like_input(x: torch.Tensor, h_is_cl: bool) -> torch.Tensor:
    """``x`` (channels_last) in the memory format of the layer's input: the perturbation changes no layout."""
    return x if h_is_cl else x.contiguous()


def _dw(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, padding=1, groups=x.shape[1])


def _conv1(m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """3x3 convolution (padding 1) of a one-channel map (B, 1, H, W) with ``w`` (1, 1, 3, 3): run as a depthwise
    conv over the batch, (1, B, H, W), which oneDNN does ~3x faster on CPU than a 1-channel conv."""
    B, _, H, W = m.shape
    if m.device.type != "cpu":
        return F.conv2d(m, w, padding=1)
    return F.conv2d(m.reshape(1, B, H, W), w.expand(B, 1, 3, 3), padding=1, groups=B).view(B, 1, H, W)


def _chan_sum(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * x.sum(1, keepdim=True)``; for channels_last ``x`` on CPU as one matrix-vector product (2x faster)."""
    B, C, H, W = x.shape
    if x.is_contiguous(memory_format=CL) and x.device.type == "cpu":
        v = torch.full((C, 1), scale, dtype=x.dtype, device=x.device)
        return (x.permute(0, 2, 3, 1).reshape(-1, C) @ v).view(B, H, W, 1).permute(0, 3, 1, 2)
    return x.sum(1, keepdim=True) * scale


# ---- the pieces of the function ---------------------------------------------------------------------------------

def _weights(fn: "PerturbFunction", C: int, like: torch.Tensor) -> dict[str, Any]:
    """phi in ``like``'s dtype, every shared 3x3 kernel expanded to a (C, 1, 3, 3) depthwise kernel."""
    dt = like.dtype
    return {
        "w1": fn.phi_1.w_identity.to(dt).expand(C, 1, 3, 3),
        "a1": fn.phi_1.w_all.to(dt),
        "w2": fn.phi_2.w_identity.to(dt).expand(C, 1, 3, 3),
        "a2": fn.phi_2.w_all.to(dt),
        "k": [fn.kernel[k:k + 1].to(dt).expand(C, 1, 3, 3) for k in range(fn.kernel.shape[0])],
        "fc": fn.fc.weight.to(dt),
    }


def _equivariant(x: torch.Tensor, w_id: torch.Tensor, w_all: torch.Tensor) -> torch.Tensor:
    """E(x) = depthwise(x; w_id expanded) + conv(mean_c x; w_all) broadcast over channels."""
    return _dw(x, w_id).add_(_conv1(_chan_sum(x, 1.0 / x.shape[1]), w_all))


def _noise_alpha(hc: torch.Tensor, w: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, r): alpha = E2(r), r = relu(E1(h)); channels_last in, channels_last out. Differentiable."""
    r = _equivariant(hc, w["w1"], w["a1"]).relu_()
    return _equivariant(r, w["w2"], w["a2"]), r


def _scale_stats(hc: torch.Tensor, kernels: list[torch.Tensor]) -> torch.Tensor:
    """g (B, C, 4) = spatial mean of relu(y_k), y_k = depthwise(h; kernel_k); differentiable (the autograd path)."""
    return torch.stack([_dw(hc, k).relu_().mean(dim=(2, 3)) for k in kernels], dim=2)


def _scale(fn: "PerturbFunction", m: torch.Tensor, v: torch.Tensor, C: int, H: int, w_fc: torch.Tensor
           ) -> torch.Tensor:
    """s (C, 1) = sigmoid(fc([m, v, C / channel_norm, H / spatial_norm]))."""
    return torch.sigmoid(fn._scale_input(m, v, C, H) @ w_fc.t())


# ---- fused depthwise convolutions (frozen phi) ----------------------------------------------------------------------

_ONE = [1, 1]
_PW: dict[str, Any] = {}


def _pointwise_ok() -> bool:
    """PyTorch's fused oneDNN convolution ops exist here and compute what :func:`_dwc` / :func:`_dwc_acc` expect
    (checked once per process on a small input; otherwise the separate ops run)."""
    ok = _PW.get("ok")
    if ok is None:
        try:
            global _CONV_PW, _CONV_PW_
            _CONV_PW = torch.ops.mkldnn._convolution_pointwise
            _CONV_PW_ = torch.ops.mkldnn._convolution_pointwise_
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(2, 16, 5, 4, generator=gen).contiguous(memory_format=CL)
            w = torch.randn(16, 1, 3, 3, generator=gen)
            acc = torch.randn(2, 16, 5, 4, generator=gen).contiguous(memory_format=CL)
            want = F.conv2d(x, w, padding=1, groups=16)
            got = _CONV_PW(x, w, None, _ONE, _ONE, _ONE, 16, "relu", [], "")
            got_acc = _CONV_PW_.binary(acc.clone(), x, w, None, _ONE, _ONE, _ONE, 16, "add", None, "relu", [], "")
            ok = bool(torch.backends.mkldnn.is_available() and torch.allclose(got, want.relu(), atol=1e-5)
                      and torch.allclose(got_acc, (want + acc).relu(), atol=1e-5))
        except Exception:  # noqa: BLE001  (a build without oneDNN, or another signature: separate ops)
            ok = False
        _PW["ok"] = ok
    return ok


def _fusable(x: torch.Tensor) -> bool:
    """oneDNN convolutions with fused post-ops apply (CPU, float32)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and _pointwise_ok()


def _dwc(x: torch.Tensor, w: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``depthwise3x3(x; w)`` (padding 1; ``w`` a contiguous (C, 1, 3, 3) kernel), relu fused into the oneDNN
    convolution when ``relu`` (float32 on the CPU)."""
    if _fusable(x):
        return _CONV_PW(x, w, None, _ONE, _ONE, _ONE, x.shape[1], "relu" if relu else "none", [], "")
    y = F.conv2d(x, w, padding=1, groups=x.shape[1])
    return y.relu_() if relu else y


def _dwc_acc(acc: torch.Tensor, x: torch.Tensor, w: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``acc = relu?(acc + depthwise3x3(x; w))`` in place, as ONE oneDNN convolution with a sum post-op (float32 on
    the CPU, ``acc`` in x's layout: the only binary fusion PyTorch runs fused; its out-of-place variant computes
    the sum separately), else as separate ops."""
    if _fusable(x) and acc.stride() == x.stride():
        return _CONV_PW_.binary(acc, x, w, None, _ONE, _ONE, _ONE, x.shape[1], "add", None, "relu" if relu else None,
                                [], "")
    acc.add_(F.conv2d(x, w, padding=1, groups=x.shape[1]))
    return acc.relu_() if relu else acc


def _broadcast(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The (B, 1, H, W) map ``m`` repeated over the channels of ``like``, in like's layout."""
    return m.expand(like.shape).contiguous(memory_format=CL if _is_cl(like) else torch.contiguous_format)


def _frozen_weights(fn: "PerturbFunction", C: int, like: torch.Tensor) -> dict[str, Any]:
    """phi in ``like``'s dtype as contiguous (C, 1, 3, 3) depthwise kernels, with the rotated (adjoint) kernels and
    the negated phi_2 kernel, and the fc weights as floats; no autograd. Cached on ``fn``, keyed by C, dtype, device
    and each phi tensor's storage and version counter (a tensor's ``_version`` grows with every in-place write:
    an optimizer step, ``load_phi``'s copy; a new ``.data`` is a new storage), so a changed phi is a new key
    without reading its 82 values back (on a GPU that read was a host sync per site and step); at most 16
    entries."""
    dt, dev = like.dtype, like.device
    params = (fn.kernel, fn.phi_1.w_identity, fn.phi_1.w_all, fn.phi_2.w_identity, fn.phi_2.w_all, fn.fc.weight)
    key = (C, dt, dev, tuple((p.data_ptr(), p._version) for p in params))
    cache = fn.__dict__.setdefault("_frozen_weights_cache", {})
    w = cache.get(key)
    if w is not None:
        return w

    with torch.no_grad():
        def dw(k: torch.Tensor) -> torch.Tensor:
            return k.detach().to(dev, dt).expand(C, 1, 3, 3).contiguous()

        def rot(k: torch.Tensor) -> torch.Tensor:
            return k.flip(-1, -2).contiguous()

        K = fn.kernel.shape[0]
        k = [dw(fn.kernel[i:i + 1]) for i in range(K)]
        w1, w2 = dw(fn.phi_1.w_identity), dw(fn.phi_2.w_identity)
        a1, a2 = (x.detach().to(dev, dt) for x in (fn.phi_1.w_all, fn.phi_2.w_all))
        fc = fn.fc.weight.detach().to(dev, dt)
        w = {"k": k, "k_t": [rot(x) for x in k], "w1": w1, "w1_t": rot(w1), "w2": w2, "w2_neg": w2.neg(),
             "w2_t": rot(w2), "a1": a1, "a1_t": rot(a1), "a2": a2, "a2_t": rot(a2), "fc": fc,
             "fm": fc[0, :K].tolist(), "fv": fc[0, K:2 * K].tolist()}
    if len(cache) >= 16:
        cache.clear()
    cache[key] = w
    return w


def _frozen_scale(hc: torch.Tensor, w: dict[str, Any], with_grad: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training-mode scale statistics with phi frozen: g (B, C, 4), and with ``with_grad`` the map ``P`` (B, C, H, W)
    that carries the whole gradient of the scale branch, ``dL/dh (scale branch) = dpre[c] * P`` with ``dpre`` =
    dL/d(fc pre-activation) of channel c (known only in backward).

    Why: g_k[b, c] = mean_hw relu(y_k), y_k = depthwise(h; kernel_k); s[c] depends on g through m = mean_b g and
    v = var_b g, so dL/dg_k[b, c] = dpre[c] * coef_k[b, c] with coef_k = fc_m[k] / B + fc_v[k] * 2 (g_k - m_k) /
    (B - 1), known in forward; hence dL/dh = dpre[c] * sum_k coef_k[b, c] / (H W) * depthwise^T(1[y_k > 0];
    kernel_k) = dpre P, where P = sum_k depthwise^T(coef_k / (H W) * 1[y_k > 0]; kernel_k) (linearity). Each y_k
    is used while in cache: relu fused into its convolution, the masked coefficients written over it
    (``threshold_backward``) and its adjoint convolution summed into P in place."""
    B, C, H, W = hc.shape
    K = len(w["k"])
    gs, P = [], None
    for k in range(K):
        y = _dwc(hc, w["k"][k], relu=True)
        gk = y.mean(dim=(2, 3))                                                      # (B, C)
        gs.append(gk)
        if with_grad:
            coef = (gk - gk.mean(dim=0)).mul_(w["fv"][k] * (2.0 / ((B - 1) * H * W))).add_(w["fm"][k] / (B * H * W))
            x = torch.ops.aten.threshold_backward.grad_input(coef.view(B, C, 1, 1).expand(B, C, H, W), y, 0.0,
                                                               grad_input=y)        # coef where y > 0, else 0
            P = _dwc(x, w["k_t"][k]) if P is None else _dwc_acc(P, x, w["k_t"][k])
        del y
    return torch.stack(gs, dim=2), P


Q_MIN = 1e-30      # sigmoid(-t) below this (t > ~69) somewhere: the exact (clamped) softplus path instead


def _frozen_noise(hc: torch.Tensor, eps: torch.Tensor | None, own_eps: bool, w: dict[str, Any], cs: torch.Tensor,
                  deterministic: bool, for_grad: bool):
    """(nz, sigcs, r): nz = -z = -softplus(alpha + eps) (or -E[softplus(alpha + eps)] when ``deterministic``),
    sigcs = c s sigmoid(alpha + eps) (``for_grad`` only), r = relu(E1(h)) (channels_last).

    E1 and E2 are one oneDNN convolution each, summed in place into a buffer that holds the channel-mean term (a
    (B, 1, H, W) map repeated over channels), relu fused; E2 computes -t = -(alpha + eps) directly (negated kernel,
    summed into -(eps + mean term), written over ``eps`` when ``own_eps``: a fresh draw of this call), so
    q = sigmoid(-t) gives z = -log q and sigmoid(t) = 1 - q."""
    C = hc.shape[1]
    r = _dwc_acc(_broadcast(_conv1(_chan_sum(hc, 1.0 / C), w["a1"]), hc), hc, w["w1"], relu=True)
    b2 = _conv1(_chan_sum(r, 1.0 / C), w["a2"])
    if deterministic:
        return expected_softplus(_dwc_acc(_broadcast(b2, r), r, w["w2"])).neg_(), None, r
    nt = torch.sub(b2.neg_(), eps, out=eps) if own_eps else torch.sub(b2.neg_(), eps)   # -(eps + mean term)
    nt = _dwc_acc(nt, r, w["w2_neg"])                               # -t
    # exact when q = sigmoid(-t) >= Q_MIN everywhere (checked on the CPU; elsewhere, to avoid a device sync, and in
    # the rare case t > ~69 somewhere, the clamped formula)
    if nt.device.type != "cpu" or bool(nt.amin() < -math.log(1.0 / Q_MIN)):
        t = nt.neg_()
        q = _sigmoid_neg(t)                                         # sigmoid(-min(t, 80))
        sigcs = torch.addcmul(cs, q, cs, value=-1.0) if for_grad else None
        return _softplus_from(q, t).neg_(), sigcs, r
    q = nt.sigmoid_()                                               # sigmoid(-t) >= Q_MIN: -log q is exact
    sigcs = torch.addcmul(cs, q, cs, value=-1.0) if for_grad else None   # c s (1 - q) = c s sigmoid(t)
    return q.log_(), sigcs, r


# ---- forward ------------------------------------------------------------------------------------------------------

def fast_forward(fn: "PerturbFunction", h: torch.Tensor, site: int, noise_coeff: float,
                 eps: torch.Tensor | None) -> torch.Tensor:
    """``fn(h, site, noise_coeff, eps)`` (arguments already checked), the fast way."""
    B, C, H, W = h.shape
    rm, rv = fn._stats_for(site, C, h)
    grad = torch.is_grad_enabled()
    frozen = not (grad and (fn.phi_trainable or (fn.deterministic and h.requires_grad)))
    if frozen and not fn.deterministic:
        if fn.impl == "triton" or (fn.native and h.is_cuda):
            from regularizers import _perturb_triton as fused   # here: it imports this module, and triton
            if fused.use(h, forced=fn.impl == "triton"):
                return fused.triton_forward(fn, h, rm, rv, float(noise_coeff), eps)
        elif fn.native and native.applies(h):
            return native.native_forward(fn, h, rm, rv, float(noise_coeff), eps)
    own_eps = eps is None and not fn.deterministic
    if own_eps:
        eps = standard_normal(h.shape, h, memory_format=CL)
    if not frozen:
        return _autograd_forward(fn, h, rm, rv, float(noise_coeff), eps)
    need_grad = grad and h.requires_grad
    c = float(noise_coeff)
    with torch.no_grad():
        w = _frozen_weights(fn, C, h)
        hc = _to_cl(h.detach())
        if eps is not None:
            eps = _to_cl(eps)
        g, P = _frozen_scale(hc, w, with_grad=need_grad) if fn.training else (None, None)
        m, v = fn._moments(g, rm, rv, h.dtype)
        s = _scale(fn, m, v, C, H, w["fc"]).view(C)
        ncs = (-c * s).view(1, C, 1, 1)                                   # -c s
        nz, sigcs, r = _frozen_noise(hc, eps, own_eps, w, -ncs, fn.deterministic, need_grad)
        # multiplier (s z - 1) c + 1 = (-z)(-c s) + (1 - c)
        if need_grad:
            mult = torch.mul(nz, ncs) if c == 1.0 else torch.addcmul(ncs.new_full((1, 1, 1, 1), 1.0 - c), nz, ncs)
        else:
            mult = nz.mul_(ncs) if c == 1.0 else nz.mul_(ncs).add_(1.0 - c)
        # written straight in the layout of h (one mixed-layout product instead of a product and a copy)
        out = torch.mul(mult, h.detach(), out=torch.empty_like(h))
        clipped = False
        if fn.clip is not None:
            # on the CPU, look before clamping so that backward can skip the mask when nothing was clipped
            clipped = out.device.type != "cpu" or bool(out.amax() > fn.clip)
            if clipped:
                out.clamp_(max=fn.clip)
    if not need_grad:
        return out
    return _FrozenPerturb.apply(h, out, (hc, nz, sigcs, r, mult, P, s), w, c, fn.clip if clipped else None)


def _autograd_forward(fn: "PerturbFunction", h: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor, c: float,
                      eps: torch.Tensor | None) -> torch.Tensor:
    """The fast ops, differentiated by autograd: used when phi trains (meta-training) and for gradients in
    deterministic mode."""
    B, C, H, W = h.shape
    w = _weights(fn, C, h)
    hc = _to_cl(h)
    alpha = _noise_alpha(hc, w)[0]
    z = expected_softplus(alpha) if fn.deterministic else _Softplus.apply(alpha + _to_cl(eps))
    g = _scale_stats(hc, w["k"]) if fn.training else None
    m, v = fn._moments(g, rm, rv, h.dtype)
    s = _scale(fn, m, v, C, H, w["fc"]).view(1, C, 1, 1)
    out = hc * ((s * z - 1) * c + 1)
    if fn.clip is not None:
        out = torch.clamp(out, max=fn.clip)
    return _like_input(out, _is_cl(h))


# ---- frozen phi: hand-written backward ------------------------------------------------------------------------------

class _FrozenPerturb(torch.autograd.Function):
    """Perturbation with phi frozen: gradient with respect to h only (through the noise branch, and in training
    also through the batch statistics of the scale function, via the map P of :func:`_frozen_scale`). Stochastic
    mode only. The forward was computed by :func:`fast_forward` (channels_last); this returns it in the layout of
    ``h``."""

    @staticmethod
    def forward(ctx, h, out, saved, w, c, clip):
        hc, nz, sigcs, r, mult, P, s = saved
        ctx.c, ctx.clip, ctx.w = c, clip, w
        ctx.h_is_cl = _is_cl(h)
        ctx.save_for_backward(hc, nz, sigcs, r, mult, P, s)
        return out

    @staticmethod
    def backward(ctx, grad):
        hc, nz, sigcs, r, mult, P, s = ctx.saved_tensors
        c, w = ctx.c, ctx.w
        B, C, H, W = hc.shape
        grad = _to_cl(grad)
        if ctx.clip is not None:
            grad = grad.masked_fill(mult * hc > ctx.clip, 0.0)
        gh = grad * hc
        dpre = None
        if P is not None:                                              # training: the scale branch
            ds = (gh * nz).sum(dim=(0, 2, 3)).mul_(-c)                  # dL/ds = c sum grad h z
            dpre = ds.mul_(s * (1 - s)).view(1, C, 1, 1)                # dL/d(fc pre-activation)
        dt = gh.mul_(sigcs)                                            # dL/dt = grad h c s sigmoid(t)
        dr = _dwc_acc(_broadcast(_conv1(_chan_sum(dt, 1.0 / C), w["a2_t"]), dt), dt, w["w2_t"])  # E2^T
        del dt, gh
        du = torch.ops.aten.threshold_backward.grad_input(dr, r, 0.0, grad_input=dr)     # relu mask of E1
        dh = torch.addcmul(_conv1(_chan_sum(du, 1.0 / C), w["a1_t"]), grad, mult)       # E1^T's mean term + direct
        if dpre is not None:
            dh.addcmul_(P, dpre)
        dh = _dwc_acc(dh, du, w["w1_t"])                                                   # + E1^T's depthwise term
        return _like_input(dh, ctx.h_is_cl), None, None, None, None, None
