"""Micro-benchmark of MetaPerturb's training-step cost (``mpbench bench metaperturb``).

``bench_metaperturb`` times one training step (forward, backward, Adam step; training mode) of a network with and
without MetaPerturb in ONE process, alternating the variants step by step so that a busy machine slows them
alike, and reports the medians and their ratios. The perturbation function gets a random phi (the cost does not
depend on its values); phi is frozen as at meta-test time.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def _attach_metaperturb(model: nn.Module, impl: str, size: int) -> list[str]:
    """MetaPerturb (random phi) at every block site of ``model`` as the variant ``impl`` runs it; the site names."""
    from regularizers.metaperturb import attach_perturbation

    return attach_perturbation(
        model, size, owner=f"bench metaperturb: {type(model).__name__}",
        impl={"reference": "reference", "release": "reference", "triton": "triton"}.get(impl, "fast"),
        native=impl != "pytorch",        # "pytorch": the fast path without its fused kernels (native C, Triton)
        # "release": the reference, phi still requiring gradients (not in the optimizer) as the authors' code runs
        trainable=impl == "release").sites


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """One Adam training step (GPU: synchronised before returning)."""
    from mpbench.bench_loop import sync_device
    from regularizers.metaperturb import PerturbFunction

    phi = {id(p) for m in model.modules() if isinstance(m, PerturbFunction) for p in m.parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad and id(p) not in phi], lr=1e-3)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sync_device(device)

    return step


def bench_metaperturb(model: str = "resnet20", batch: int = 128, size: int = 32, threads: int = 2,
                      steps: int = 20, warmup: int = 3, impls: tuple[str, ...] = ("fast", "reference"),
                      num_classes: int = 100, seed: int = 0, channels_last: bool = False, malloc_tune: bool = True,
                      verbose: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Median ms per training step of ``model`` without ("base") and with MetaPerturb (one entry per ``impls``:
    "fast" = mpbench's default implementation (native CPU kernels where they build, Triton kernels on CUDA where
    triton runs), "pytorch" = the same without those fused kernels, "triton" = the fast path forced onto the Triton
    kernels (CUDA), "reference" = the direct one, "release" = the direct one with phi still requiring gradients as
    in the authors' code), measured interleaved.

    ``channels_last`` runs every variant (network and input) in that memory format; ``malloc_tune`` (default, as
    every training run of mpbench) calls :func:`mpbench.malloc.tune_for_training` first (a process-wide setting:
    it cannot be undone, so ``malloc_tune=False`` measures glibc's defaults only in a fresh process).

    Returns ``{model, batch, size, threads, steps, warmup, torch, sites, channels_last, malloc_tune, base_ms,
    base_cpu_ms, <impl>_ms, <impl>_ratio, <impl>_cpu_ms, <impl>_cpu_ratio}`` (wall-clock and process-CPU medians;
    ``cpu_kernel`` / ``gpu_kernel`` say which execution "fast" runs on the device, "n/a" on the other).
    """
    if "triton" in impls:
        from mpbench.errors import UsageError
        from regularizers import _perturb_triton

        why = _perturb_triton.why_unavailable() or (None if device.startswith("cuda") or _perturb_triton.INTERPRET
                                                    else "the kernels run on CUDA tensors")
        if why:
            raise UsageError(f"--impl triton: {why}: run it with --device cuda on a GPU (or TRITON_INTERPRET=1 for "
                             f"triton's slow CPU interpreter), or leave --impl triton out")
    import timm

    import mpbench.models  # noqa: F401  (registers the CIFAR nets into timm)

    from mpbench.bench_loop import interleaved_medians
    from mpbench.malloc import tune_for_training

    tuned = tune_for_training() if malloc_tune else False
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        torch.manual_seed(seed)
        base = timm.create_model(model, num_classes=num_classes).to(memory_format=fmt)
        variants: dict[str, nn.Module] = {"base": base}
        sites: list[str] = []
        for impl in impls:
            m = copy.deepcopy(base)
            sites = _attach_metaperturb(m, impl, size)
            variants[impl] = m
        dev = torch.device(device)
        for m in variants.values():
            m.to(dev)
        x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=fmt)
        y = torch.randint(0, num_classes, (batch,), device=dev)
        med, cmed = interleaved_medians({k: _step_fn(m, x, y, dev) for k, m in variants.items()}, warmup, steps)
    finally:
        torch.set_num_threads(prev_threads)
    out: dict[str, Any] = {"model": model, "device": device, "batch": batch, "size": size, "threads": int(threads),
                           "steps": steps,
                           "warmup": warmup, "torch": torch.__version__, "sites": len(sites),
                           "channels_last": bool(channels_last), "malloc_tune": tuned,
                           "cpu_kernel": _cpu_kernel(device), "gpu_kernel": _gpu_kernel(device)}
    med = {k: v * 1e3 for k, v in med.items()}
    cmed = {k: v * 1e3 for k, v in cmed.items()}
    out["base_ms"] = round(med["base"], 2)
    out["base_cpu_ms"] = round(cmed["base"], 2)
    for impl in impls:
        out[f"{impl}_ms"] = round(med[impl], 2)
        out[f"{impl}_cpu_ms"] = round(cmed[impl], 2)
        out[f"{impl}_ratio"] = round(med[impl] / med["base"], 3)
        out[f"{impl}_cpu_ratio"] = round(cmed[impl] / cmed["base"], 3)
    if verbose:
        print(format_result(out))
    return out


def _cpu_kernel(device: str) -> str:
    from regularizers.metaperturb import cpu_kernel

    return cpu_kernel() if torch.device(device).type == "cpu" else "n/a"


def _gpu_kernel(device: str) -> str:
    """What "fast" runs on a CUDA device: ``triton`` or ``pytorch (<why not triton>)``."""
    if torch.device(device).type != "cuda":
        return "n/a"
    from regularizers import _perturb_triton

    reason = _perturb_triton.why_unavailable()
    return "triton" if reason is None else f"pytorch ({reason})"


def format_result(r: dict[str, Any]) -> str:
    kernel = next((r[k] for k in ("cpu_kernel", "gpu_kernel") if r.get(k, "n/a") != "n/a"), None)
    head = (f"metaperturb bench: {r['model']}, {r['device']}, batch {r['batch']}, {r['size']} px, {r['threads']} threads, "
            f"{r['sites']} sites, Adam step, median of {r['steps']} interleaved steps (torch {r['torch']}"
            f"{', channels_last' if r['channels_last'] else ''}{', malloc tuned' if r['malloc_tune'] else ''}"
            f"{', fast = ' + kernel + ' kernels' if kernel else ''})")
    lines = [head, f"  {'':<10} {'wall ms/step':>12} {'ratio':>6}   {'cpu ms/step':>11} {'ratio':>6}",
             f"  {'base':<10} {r['base_ms']:12.1f} {1:6.2f}   {r['base_cpu_ms']:11.1f} {1:6.2f}"]
    for k in r:
        if k.endswith("_cpu_ratio"):
            impl = k[:-10]
            lines.append(f"  {impl:<10} {r[impl + '_ms']:12.1f} {r[impl + '_ratio']:6.2f}   "
                         f"{r[impl + '_cpu_ms']:11.1f} {r[k]:6.2f}")
    lines.append("  (wall: median over interleaved steps; cpu: process CPU time, robust to other load on the machine "
                 "but counting OpenMP spin-waits when threads > 1)")
    return "\n".join(lines)
