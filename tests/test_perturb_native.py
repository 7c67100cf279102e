"""MetaPerturb's native CPU kernels (regularizers/_perturb_kernel.c): the build, the noise they draw, and the
fallback to the PyTorch path. (Their math against the reference: tests/test_metaperturb.py, ``cpu_backend``.)"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import logging
import math

import pytest
import torch

from regularizers.metaperturb import PerturbFunction, native


def frozen(num_sites=1, **kw) -> PerturbFunction:
    torch.manual_seed(3)
    fn = PerturbFunction(num_sites=num_sites, **kw)
    with torch.no_grad():                      # phi of the released file's scale (|w| ~ 0.1-1), not the 0.01 init
        for p in fn.parameters():
            p.normal_(0.0, 0.5)
    fn.phi_trainable = False
    return fn


def test_the_kernel_builds_here_and_is_cached(tmp_path, monkeypatch):
    assert native.library() is not None, native.why_unavailable()
    monkeypatch.setenv("MPBENCH_CACHE", str(tmp_path))
    first = native.build()
    assert first.parent == tmp_path / "kernels" and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == stamp      # reused, not rebuilt
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]    # no temporary left behind


def test_no_compiler_falls_back_to_pytorch_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MPBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_STATE", {})
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.library() is None
        assert native.library() is None
    assert "no C compiler" in native.why_unavailable()
    assert len([r for r in caplog.records if "native CPU kernel unavailable" in r.message]) == 1
    fn = frozen()
    h = torch.randn(4, 3, 5, 5, requires_grad=True)
    fn(h).sum().backward()                      # the PyTorch path runs
    assert h.grad is not None and torch.isfinite(h.grad).all()
    monkeypatch.delenv("CC")
    monkeypatch.setenv("MPBENCH_NATIVE", "0")
    monkeypatch.setattr(native, "_STATE", {})
    assert native.library() is None and "MPBENCH_NATIVE=0" in native.why_unavailable()


def test_a_broken_source_is_a_build_error_not_a_crash(tmp_path, monkeypatch):
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setenv("MPBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "SOURCE", bad)
    with pytest.raises(RuntimeError, match="C compiler failed"):
        native.build()
    assert not list((tmp_path / "kernels").iterdir())


def _eps_drawn(fn: PerturbFunction, h: torch.Tensor) -> torch.Tensor:
    """The eps that ``fn(h)`` (evaluation mode, no clip, noise coefficient 1: out = h s z) drew after
    ``torch.manual_seed(11)``, recovered from the output: s and alpha from two calls with eps given large (where
    softplus is linear), then eps = softplus^-1(out / (h s)) - alpha."""
    torch.manual_seed(11)
    out = fn(h)
    hi, lo = fn(h, eps=torch.full_like(h, 30.0)), fn(h, eps=torch.full_like(h, 20.0))   # h s (alpha + 30 | 20)
    hs = (hi - lo).double() / 10.0
    alpha = hi.double() / hs - 30.0
    return torch.log(torch.expm1(out.double() / hs)) - alpha


def test_native_noise_is_standard_normal_reproducible_and_thread_independent():
    fn = frozen(clip=None).eval()
    h = torch.rand(64, 8, 16, 16) + 0.5                          # positive: the multiplier is recoverable
    prev = torch.get_num_threads()
    try:
        outs = []
        for threads in (2, 1):
            torch.set_num_threads(threads)
            torch.manual_seed(11)
            outs.append(fn(h))
    finally:
        torch.set_num_threads(prev)
    # the same seed draws the same noise whatever the number of threads (counter-based generator) ...
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.equal(fn(h), outs[0])                        # ... and a fresh draw per call
    x = _eps_drawn(fn, h)
    assert x.numel() == 131072 and torch.isfinite(x).all()
    assert abs(x.mean().item()) < 0.015 and abs(x.var().item() - 1) < 0.02
    for t in (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0):  # the CDF (standard error <= 0.0014 here)
        want = 0.5 * (1 + math.erf(t / math.sqrt(2)))
        assert abs((x < t).double().mean().item() - want) < 0.006, t
    assert x.abs().max() < 6.0                                    # 24-bit uniforms: |eps| <= 5.77, as torch's
    # no correlation between neighbours in a row, across channels, or between the two halves of a plane (the two
    # normals of one Box-Muller pair)
    for u, v in ((x[..., 1:], x[..., :-1]), (x[:, 1:], x[:, :-1]), (x[..., :8, :], x[..., 8:, :])):
        assert abs(torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1].item()) < 0.015


def test_native_gradients_agree_with_the_pytorch_path_on_a_network_sized_input(monkeypatch):
    """Training mode, clipping, noise coefficient < 1: outputs, running statistics and the gradient (including the
    batch-statistics branch) equal the PyTorch path's for the same eps at ResNet-20's first stage size."""
    fn = frozen(clip=3.0)
    other = copy.deepcopy(fn)
    h = torch.randn(16, 16, 32, 32) * 2
    eps, g = torch.randn_like(h), torch.randn_like(h)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    o1 = fn(h1, noise_coeff=0.6, eps=eps)
    monkeypatch.setattr(native, "applies", lambda x: False)
    o2 = other(h2, noise_coeff=0.6, eps=eps)
    assert (o2 >= 3.0).any()
    torch.testing.assert_close(o1, o2, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fn.running_var_0, other.running_var_0)
    (o1 * g).sum().backward()
    (o2 * g).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=2e-5, rtol=1e-4)


def test_malloc_tuning_is_on_by_default_and_can_be_opted_out(monkeypatch):
    from mpbench import malloc

    monkeypatch.setattr(malloc, "_TUNED", {})
    monkeypatch.setattr(malloc, "tune_malloc", lambda threshold=1 << 30: True)
    assert malloc.tune_for_training() is True
    monkeypatch.setattr(malloc, "_TUNED", {})
    monkeypatch.setenv("MPBENCH_MALLOC_TUNE", "0")
    assert malloc.tune_for_training() is False


def test_an_unwritable_cache_names_the_fix(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MPBENCH_CACHE", str(blocker))           # a file where the cache directory should be
    with pytest.raises(RuntimeError, match="MPBENCH_CACHE to a writable directory"):
        native.build()
