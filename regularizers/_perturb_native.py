"""MetaPerturb with phi frozen on the CPU as fused native kernels (``_perturb_kernel.c``), the default for float32
CPU tensors whenever a C compiler is available.

The kernel file is compiled at first use with the system C compiler (``cc -O3 -march=native -fopenmp``, about 1 s)
into ``$MPBENCH_CACHE`` (default ``~/.cache/mpbench``; the file name carries a hash of the source, the flags, the
compiler and the CPU, so a node of another kind builds its own), written atomically so that concurrent workers can
race, and loaded with ctypes. Its OpenMP is the process's: PyTorch's ``libgomp.so.1`` is already loaded and the
kernel's dependency on that soname resolves to it, so the two share one thread pool. Where no compiler works, or
with ``MPBENCH_NATIVE=0``, :func:`library` is None and :mod:`regularizers._perturb_fast`'s PyTorch path runs (one
warning says why, :func:`why_unavailable` too).

Same math as the reference; the Gaussian draw is the same distribution, N(0, 1) by Box-Muller from 24-bit
uniforms as torch's CPU sampler, from a counter-based generator (SplitMix64) seeded by one 63-bit draw from torch's
default generator per call: reproducible under ``torch.manual_seed``, independent of the thread count, and a
different stream of numbers than ``torch.randn`` (the run records which path ran).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.autograd.function import once_differentiable

from mpbench.config import env_opted_out

if TYPE_CHECKING:
    from regularizers._perturb import PerturbFunction

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_perturb_kernel.c")
_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
FLAG_SETS = ((["-march=native", *_FLAGS], ["-lm"]), (_FLAGS, ["-lm"]))     # the second: compilers without -march
_STATE: dict[str, object] = {}

_F = ctypes.POINTER(ctypes.c_float)
_B = ctypes.POINTER(ctypes.c_uint8)
_I, _U64, _FL = ctypes.c_int, ctypes.c_uint64, ctypes.c_float
SIGNATURES = {
    "mp_stats": [_F, _I, _I, _I, _I, _F, _F, _B, _I],
    "mp_forward": [_F, _I, _I, _I, _I, _F, _F, _FL, _I, _FL, _U64, _F, _F, _F, _B, _I],
    "mp_backward": [_F, _F, _F, _B, _I, _I, _I, _I, _F, _F, _FL, _I, _FL, _F, _F, _I],
    "mp_scale_backward": [_B, _I, _I, _I, _I, _F, _F, _F, _I],
    "mp_mask_size": [_I, _I],
}


def cache_dir() -> Path:
    from mpbench.config import cache_dir as mpbench_cache

    return mpbench_cache() / "kernels"


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def build() -> Path:
    """Compile the kernel (cached in :func:`cache_dir`) and return the library's path; raises RuntimeError with
    the compiler's first error line."""
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C compiler ({cc}: {e})") from None
    src = SOURCE.read_bytes()
    errors = []
    for flags, libs in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([src, " ".join(flags + libs).encode(), version.encode(),
                                         _cpu_id().encode(), platform.machine().encode()])).hexdigest()[:16]
        out = cache_dir() / f"perturb_{key}.so"
        if out.is_file():
            return out
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".perturb_", suffix=".so", dir=out.parent)
        except OSError as e:
            raise RuntimeError(f"cannot write the kernel cache {out.parent} ({e.strerror or e}); set MPBENCH_CACHE "
                               f"to a writable directory") from None
        os.close(fd)
        try:
            r = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, *libs], capture_output=True, text=True,
                               timeout=300)
            if r.returncode == 0:
                os.replace(tmp, out)
                return out
            errors.append(next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:200]))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"the C compiler failed ({errors[0]})")


def _load() -> ctypes.CDLL | None:
    if env_opted_out("MPBENCH_NATIVE"):
        _STATE["why"] = "disabled by MPBENCH_NATIVE=0"
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        _STATE["why"] = str(e)
        log.warning("MetaPerturb native CPU kernel unavailable (%s); using the slower PyTorch path (a C compiler "
                    "with OpenMP, e.g. gcc, enables it; MPBENCH_NATIVE=0 silences this)", e)
        return None
    for name, args in SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = ctypes.c_int if name == "mp_mask_size" else None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first call; None where it cannot be (see :func:`why_unavailable`)."""
    if "lib" not in _STATE:
        _STATE["lib"] = _load()
    return _STATE["lib"]  # type: ignore[return-value]


def why_unavailable() -> str | None:
    return None if library() is not None else str(_STATE.get("why"))


def describe() -> str:
    """Which CPU execution runs, as results and benchmarks record it: ``native`` or ``pytorch (<why>)``."""
    return "native" if library() is not None else f"pytorch ({why_unavailable()})"


def applies(h: torch.Tensor) -> bool:
    """The native kernels handle ``h``: a float32 CPU tensor, and the library is available."""
    return h.device.type == "cpu" and h.dtype == torch.float32 and library() is not None


# ---- calls ----------------------------------------------------------------------------------------------------------

def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.cast(t.data_ptr(), _B if t.dtype == torch.uint8 else _F)


def _phi(fn: "PerturbFunction") -> torch.Tensor:
    """phi's 72 convolution weights in the kernel's order (the fc weights stay in Python)."""
    with torch.no_grad():
        return torch.cat([fn.kernel.reshape(-1), fn.phi_1.w_identity.reshape(-1), fn.phi_1.w_all.reshape(-1),
                          fn.phi_2.w_identity.reshape(-1), fn.phi_2.w_all.reshape(-1)]).to("cpu", torch.float32)


def _seed() -> int:
    """One 63-bit draw from torch's default CPU generator (so torch.manual_seed governs the noise)."""
    return int(torch.empty((), dtype=torch.int64).random_())


def native_forward(fn: "PerturbFunction", h: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor, c: float,
                   eps: torch.Tensor | None) -> torch.Tensor:
    """``fn(h, site, c, eps)`` with phi frozen and stochastic noise, by the native kernels (``applies(h)``)."""
    from regularizers._perturb_fast import _scale

    lib = library()
    B, C, H, W = h.shape
    threads = torch.get_num_threads()
    hn = h.detach().contiguous()
    epsn = None if eps is None else eps.detach().to(torch.float32).contiguous()
    phi = _phi(fn)
    need_grad = torch.is_grad_enabled() and h.requires_grad
    g = masks = z = None
    if need_grad:       # what backward needs besides h: z = softplus(alpha + eps) and a byte of indicator bits
        n = lib.mp_mask_size(H, W)
        z = torch.empty(B, C, n)
        masks = (torch.empty if fn.training else torch.zeros)(B, C, n, dtype=torch.uint8)
    if fn.training:
        g = torch.empty(B, C, 4)
        lib.mp_stats(_ptr(hn), B, C, H, W, _ptr(phi), _ptr(g), _ptr(masks), threads)
    with torch.no_grad():
        m, v = fn._moments(g, rm, rv, h.dtype)
        s = _scale(fn, m, v, C, H, fn.fc.weight.detach().to(h.dtype)).reshape(C).contiguous()
    seed = 0 if epsn is not None else _seed()
    clip = fn.clip
    out = torch.empty_like(hn)
    lib.mp_forward(_ptr(hn), B, C, H, W, _ptr(phi), _ptr(s), float(c), int(clip is not None),
                   float(clip or 0.0), seed, _ptr(epsn), _ptr(out), _ptr(z), _ptr(masks), threads)
    if need_grad:
        out = _NativePerturb.apply(h, out, (fn, hn, z, masks, phi, g, m, s, float(c), clip))
    return out.contiguous(memory_format=torch.channels_last) if _is_cl(h) else out


def _is_cl(h: torch.Tensor) -> bool:
    return h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()


class _NativePerturb(torch.autograd.Function):
    """Gradient with respect to h (phi frozen): the noise branch and the direct term by ``mp_backward``; in
    training, the batch statistics of the scale function by ``mp_scale_backward``."""

    @staticmethod
    def forward(ctx, h, out, state):
        ctx.state = state
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        fn, hn, z, masks, phi, g, m, s, c, clip = ctx.state
        lib = library()
        B, C, H, W = hn.shape
        threads = torch.get_num_threads()
        grad = grad.to(torch.float32).contiguous()
        dh = torch.empty_like(hn)
        ds = torch.empty(B, C)
        lib.mp_backward(_ptr(grad), _ptr(hn), _ptr(z), _ptr(masks), B, C, H, W, _ptr(phi), _ptr(s), c,
                        int(clip is not None), float(clip or 0.0), _ptr(dh), _ptr(ds), threads)
        if g is not None:
            # dL/dg[b, c, k] / (H W), g's dependence through m = mean_b g and v = var_b g (unbiased)
            K = g.shape[2]
            with torch.no_grad():
                fc = fn.fc.weight.detach().to(torch.float32).reshape(-1)
                dpre = ds.sum(0).mul_(c).mul_(s * (1 - s))                                  # (C,)
                coef = (g - m).mul_(fc[K:2 * K] * (2.0 / (B - 1))).add_(fc[:K] / B)          # (B, C, K)
                w = coef.mul_(dpre.view(1, C, 1) / (H * W)).contiguous()
            lib.mp_scale_backward(_ptr(masks), B, C, H, W, _ptr(phi), _ptr(w), _ptr(dh), threads)
        return dh, None, None
