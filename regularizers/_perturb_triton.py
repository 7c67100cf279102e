"""MetaPerturb's element-wise chain on CUDA as fused Triton kernels (Ryu, Shin, Lee, Hwang, NeurIPS 2020, arXiv
2006.07540).

With phi frozen, in stochastic mode, on float32 CUDA tensors, ``PerturbFunction(impl="fast")`` runs
:func:`triton_forward` where :func:`available` (``impl="triton"`` forces it). It computes the same math as the
PyTorch execution of :mod:`regularizers._perturb_fast` (which runs everything else: deterministic mode, trainable
phi, other dtypes) and reuses its pieces: the convolutions stay PyTorch's (cuDNN), as does the scale function's
branch (:func:`regularizers._perturb_fast._frozen_scale`). The kernels fuse what lies between the convolutions, all
in channels_last, one program per tile of (positions, all channels):

- :func:`_rows_kernel`: E1's ``relu(depthwise + channel-mean term)`` in forward and E2^T's sum and ReLU mask in
  backward, in place, each also writing the channel mean that the next one-channel conv takes;
- :func:`_noise_fwd_kernel`: ``t = alpha + eps``, ``z = softplus(t)``, ``out = min(h ((s z - 1) c + 1), clip)``
  written in h's layout; ``t`` (over alpha's buffer) is all that backward keeps of the chain;
- :func:`_noise_bwd_kernel`: the clip mask, ``dL/dt = g h c s sigmoid(t)`` and its channel mean, the direct term
  ``g mult`` and per-tile partial sums of ``g h z`` (dL/ds, summed in a fixed order: deterministic);
- :func:`_grad_h_kernel`: ``dL/dh`` = E1^T's two terms + the direct term + the scale branch's ``P dpre``.

The Gaussian draw is PyTorch's own sampler (``eps`` is passed in), so the noise is the PyTorch path's, number for
number. Under torch.compile the PyTorch execution runs (dynamo traces it). ``TRITON_INTERPRET=1`` before triton is
imported (triton reads it when a kernel is decorated) runs the kernels on CPU tensors: how the tests check them
without a GPU.
"""
from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable

from regularizers import _perturb_fast as fast

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = ""
except ImportError as e:  # the kernels below are then never launched (available() is False)
    triton = tl = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

if TYPE_CHECKING:
    from regularizers._perturb import PerturbFunction

log = logging.getLogger(__name__)
TILE = 2048                      # elements per program: BLOCK_P positions x BLOCK_C (all) channels
_jit = triton.jit if triton is not None else (lambda fn: fn)
_WARNED: list[str] = []


# ---- availability ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _gpu_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        triton.runtime.driver.active.get_current_target()
    except Exception as e:  # noqa: BLE001  (no driver triton can use)
        return f"triton finds no GPU driver ({type(e).__name__}: {e})"
    return ""


def why_unavailable() -> str | None:
    """Why the kernels cannot run in this process (None: they can, on the GPU or under the interpreter)."""
    if triton is None:
        return f"triton does not import ({_IMPORT_ERROR})"
    return None if INTERPRET else (_gpu_reason() or None)


def available() -> bool:
    """triton imports and a GPU driver is there (or ``TRITON_INTERPRET=1``)."""
    return why_unavailable() is None


def why_not(h: torch.Tensor) -> str | None:
    """Why the kernels cannot take the feature map ``h`` (None: they can)."""
    reason = why_unavailable()
    if reason is None and h.dtype != torch.float32:
        reason = f"float32 only, got {h.dtype}"
    if reason is None and not (h.is_cuda or INTERPRET):
        reason = f"CUDA tensors only, got a {h.device.type} tensor (TRITON_INTERPRET=1 runs them on the CPU)"
    return reason


def use(h: torch.Tensor, forced: bool) -> bool:
    """Whether the kernels run for ``h``; ``forced`` (``impl="triton"``) turns a reason why not into an error, else
    it is logged once and the PyTorch execution runs. Under torch.compile they never do: dynamo traces the PyTorch
    execution, as before they existed (and inductor fuses it)."""
    if torch.compiler.is_compiling():
        return False
    reason = why_not(h)
    if reason is not None and forced:
        raise RuntimeError(f"MetaPerturb impl='triton': {reason}")
    if reason is not None and reason not in _WARNED:
        _WARNED.append(reason)
        log.warning("MetaPerturb: the Triton kernels do not run (%s); the PyTorch execution does", reason)
    return reason is None


# ---- kernels --------------------------------------------------------------------------------------------------------

@_jit
def _tile(N, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows p (positions b*HW + hw) and channels ch of this program, their mask and channels_last offsets."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.arange(0, BLOCK_C)
    mask = (p < N)[:, None] & (ch < C)[None, :]
    return p, ch, mask, p[:, None] * C + ch[None, :]


@_jit
def _strided(p, ch, HW, W, s0, s1, s2, s3):
    """Offsets of (p, ch) in a (B, C, H, W) tensor of strides s0..s3 (any layout, e.g. the caller's)."""
    b = p // HW
    hw = p - b * HW
    y = hw // W
    return (b * s0 + (hw - y * W) * s3 + y * s2)[:, None] + ch.to(tl.int64)[None, :] * s1


@_jit
def _softplus_sigmoid(t):
    """(softplus(t), sigmoid(t)) from e = exp(-|t|); log1p(e) as log(u) e / (u - 1), u = 1 + e (Goldberg's form:
    relatively accurate as e -> 0, where log(1 + e) is not; libdevice's log1p has no interpreter version)."""
    e = tl.exp(-tl.abs(t))
    u = 1.0 + e
    tiny = u == 1.0
    log1p = tl.where(tiny, e, tl.log(u) * e / tl.where(tiny, 1.0, u - 1.0))
    return tl.maximum(t, 0.0) + log1p, tl.where(t >= 0, 1.0, e) / u


@_jit
def _rows_kernel(x_ptr, b_ptr, r_ptr, mean_ptr, N, C, inv_c, MASK_BY_R: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """x = relu(x + b[p]) (or x + b[p] where r > 0, else 0) in place; mean[p] = mean_c x."""
    p, ch, mask, off = _tile(N, C, BLOCK_P, BLOCK_C)
    x = tl.load(x_ptr + off, mask=mask, other=0.0) + tl.load(b_ptr + p, mask=p < N, other=0.0)[:, None]
    if MASK_BY_R:
        x = tl.where(tl.load(r_ptr + off, mask=mask, other=0.0) > 0, x, 0.0)
    else:
        x = tl.maximum(x, 0.0)
    x = tl.where(mask, x, 0.0)
    tl.store(x_ptr + off, x, mask=mask)
    tl.store(mean_ptr + p, tl.sum(x, axis=1) * inv_c, mask=p < N)


@_jit
def _noise_fwd_kernel(h_ptr, a_ptr, b_ptr, eps_ptr, s_ptr, out_ptr, N, C, HW, W, o0, o1, o2, o3, c, clip,
                      HAS_CLIP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """t = a + b[p] + eps (stored over a); out = min(h ((s softplus(t) - 1) c + 1), clip) at strides o0..o3."""
    p, ch, mask, off = _tile(N, C, BLOCK_P, BLOCK_C)
    t = (tl.load(a_ptr + off, mask=mask, other=0.0) + tl.load(b_ptr + p, mask=p < N, other=0.0)[:, None]
         + tl.load(eps_ptr + off, mask=mask, other=0.0))
    tl.store(a_ptr + off, t, mask=mask)
    z, _ = _softplus_sigmoid(t)
    s = tl.load(s_ptr + ch, mask=ch < C, other=0.0)[None, :]
    out = tl.load(h_ptr + off, mask=mask, other=0.0) * ((s * z - 1.0) * c + 1.0)
    if HAS_CLIP:
        out = tl.minimum(out, clip)
    tl.store(out_ptr + _strided(p, ch, HW, W, o0, o1, o2, o3), out, mask=mask)


@_jit
def _noise_bwd_kernel(g_ptr, h_ptr, t_ptr, s_ptr, dt_ptr, gm_ptr, mean_ptr, part_ptr, N, C, HW, W, g0, g1, g2, g3,
                      c, clip, inv_c, HAS_CLIP: tl.constexpr, SCALE_GRAD: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """From the output's gradient g (strides g0..g3): dt = g h c s sigmoid(t) and mean[p] = mean_c dt,
    gm = g mult (g zero where the output was clipped) and, with SCALE_GRAD, part[tile, ch] = sum_p g h z."""
    p, ch, mask, off = _tile(N, C, BLOCK_P, BLOCK_C)
    g = tl.load(g_ptr + _strided(p, ch, HW, W, g0, g1, g2, g3), mask=mask, other=0.0)
    h = tl.load(h_ptr + off, mask=mask, other=0.0)
    z, sig = _softplus_sigmoid(tl.load(t_ptr + off, mask=mask, other=0.0))
    s = tl.load(s_ptr + ch, mask=ch < C, other=0.0)[None, :]
    mult = (s * z - 1.0) * c + 1.0
    if HAS_CLIP:
        g = tl.where(h * mult > clip, 0.0, g)
    gh = tl.where(mask, g * h, 0.0)
    dt = gh * (c * s) * sig
    tl.store(dt_ptr + off, dt, mask=mask)
    tl.store(gm_ptr + off, g * mult, mask=mask)
    tl.store(mean_ptr + p, tl.sum(dt, axis=1) * inv_c, mask=p < N)
    if SCALE_GRAD:
        tl.store(part_ptr + tl.program_id(0) * C + ch, tl.sum(gh * z, axis=0), mask=ch < C)


@_jit
def _grad_h_kernel(y_ptr, b_ptr, gm_ptr, pmap_ptr, d_ptr, out_ptr, N, C, HW, W, o0, o1, o2, o3,
                   SCALE_GRAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out (strides o0..o3) = y + b[p] + gm (+ pmap d[ch])."""
    p, ch, mask, off = _tile(N, C, BLOCK_P, BLOCK_C)
    dh = (tl.load(y_ptr + off, mask=mask, other=0.0) + tl.load(b_ptr + p, mask=p < N, other=0.0)[:, None]
          + tl.load(gm_ptr + off, mask=mask, other=0.0))
    if SCALE_GRAD:
        d = tl.load(d_ptr + ch, mask=ch < C, other=0.0)[None, :]
        dh += tl.load(pmap_ptr + off, mask=mask, other=0.0) * d
    tl.store(out_ptr + _strided(p, ch, HW, W, o0, o1, o2, o3), dh, mask=mask)


# whether triton decorated the kernels for its interpreter (TRITON_INTERPRET=1 at import): CPU tensors then work
INTERPRET = triton is not None and not isinstance(_tile, triton.runtime.JITFunction)


# ---- launchers ------------------------------------------------------------------------------------------------------

def _launch(x: torch.Tensor) -> dict[str, Any]:
    """Sizes and grid for the (B, C, H, W) tensor ``x``: N = B*H*W positions in tiles of BLOCK_P x BLOCK_C."""
    B, C, H, W = x.shape
    bc = triton.next_power_of_2(C)
    bp = max(TILE // bc, 1)
    return {"grid": (triton.cdiv(B * H * W, bp),), "N": B * H * W, "C": C, "HW": H * W, "W": W,
            "blocks": {"BLOCK_P": bp, "BLOCK_C": bc}}


def _rows(x: torch.Tensor, b: torch.Tensor, r: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, mean_c x) after ``x = relu(x + b)`` (``r`` None) or ``x = (x + b) 1[r > 0]``, in place; ``b`` (B, 1, H, W)
    is broadcast over channels."""
    x, L = fast._to_cl(x), _launch(x)
    mean = x.new_empty(x.shape[0], 1, *x.shape[2:])
    _rows_kernel[L["grid"]](x, b.contiguous(), x if r is None else r, mean, L["N"], L["C"], 1.0 / L["C"],
                            MASK_BY_R=r is not None, **L["blocks"])
    return x, mean


def _noise_forward(hc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: torch.Tensor, s: torch.Tensor, c: float,
                   clip: float | None, like: torch.Tensor) -> torch.Tensor:
    """The output in ``like``'s layout; ``a`` (alpha's depthwise term, channels_last) becomes t = alpha + eps."""
    L = _launch(hc)
    out = torch.empty_like(like)
    _noise_fwd_kernel[L["grid"]](hc, a, b.contiguous(), eps, s, out, L["N"], L["C"], L["HW"], L["W"], *out.stride(),
                                 float(c), 0.0 if clip is None else float(clip), HAS_CLIP=clip is not None,
                                 **L["blocks"])
    return out


class _TritonPerturb(torch.autograd.Function):
    """The perturbation with phi frozen: gradient with respect to h only (as ``_perturb_fast._FrozenPerturb``, from
    ``t`` instead of the stored multiplier and noise), returned in the layout of h."""

    @staticmethod
    def forward(ctx, h, out, saved, w, c, clip):
        ctx.c, ctx.clip, ctx.w, ctx.h_is_cl = c, clip, w, fast._is_cl(h)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        hc, t, r, s, pmap = ctx.saved_tensors
        c, w, L = ctx.c, ctx.w, _launch(hc)
        scale_grad = pmap is not None
        dt, gm = torch.empty_like(hc), torch.empty_like(hc)
        mdt = hc.new_empty(hc.shape[0], 1, *hc.shape[2:])
        part = hc.new_empty(L["grid"][0], L["C"]) if scale_grad else dt   # (else: any pointer, never read)
        _noise_bwd_kernel[L["grid"]](grad, hc, t, s, dt, gm, mdt, part, L["N"], L["C"], L["HW"], L["W"],
                                     *grad.stride(), float(c), 0.0 if ctx.clip is None else float(ctx.clip),
                                     1.0 / L["C"], HAS_CLIP=ctx.clip is not None, SCALE_GRAD=scale_grad,
                                     **L["blocks"])
        du, mdu = _rows(fast._dwc(dt, w["w2_t"]), fast._conv1(mdt, w["a2_t"]), r)          # E2^T, relu mask
        del dt
        y, b = fast._dwc(du, w["w1_t"]), fast._conv1(mdu, w["a1_t"])                       # E1^T
        dpre = part.sum(dim=0).mul_(c).mul_(s * (1 - s)) if scale_grad else s              # dL/d(fc pre-act.)
        dh = torch.empty_like(hc) if ctx.h_is_cl else torch.empty(hc.shape, dtype=hc.dtype, device=hc.device)
        _grad_h_kernel[L["grid"]](fast._to_cl(y), b.contiguous(), gm, pmap if scale_grad else gm, dpre, dh, L["N"],
                                  L["C"], L["HW"], L["W"], *dh.stride(), SCALE_GRAD=scale_grad, **L["blocks"])
        return dh, None, None, None, None, None


# ---- forward --------------------------------------------------------------------------------------------------------

def triton_forward(fn: "PerturbFunction", h: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor, c: float,
                   eps: torch.Tensor | None) -> torch.Tensor:
    """``fn(h, site, c, eps)`` with phi frozen in stochastic mode (``rm, rv``: the site's running statistics)."""
    C, H = h.shape[1], h.shape[2]
    need_grad = torch.is_grad_enabled() and h.requires_grad
    with torch.no_grad():
        eps = fast.standard_normal(h.shape, h, memory_format=fast.CL) if eps is None else fast._to_cl(eps.to(h))
        w = fast._frozen_weights(fn, C, h)
        hc = fast._to_cl(h.detach())
        g, pmap = fast._frozen_scale(hc, w, with_grad=need_grad) if fn.training else (None, None)
        m, v = fn._moments(g, rm, rv, h.dtype)
        s = fast._scale(fn, m, v, C, H, w["fc"]).reshape(C).contiguous()
        r, mr = _rows(fast._dwc(hc, w["w1"]), fast._conv1(fast._chan_sum(hc, 1.0 / C), w["a1"]))   # relu(E1(h))
        t = fast._to_cl(fast._dwc(r, w["w2"]))                                  # alpha's depthwise term, then t
        out = _noise_forward(hc, t, fast._conv1(mr, w["a2"]), eps, s, c, fn.clip, like=h)
    if not need_grad:
        return out
    return _TritonPerturb.apply(h, out, (hc, t, r, s, pmap), w, c, fn.clip)
