"""MetaPerturb's Triton kernels (regularizers/_perturb_triton.py) equal the PyTorch execution and the reference.

Without a GPU the kernels run under triton's interpreter (:class:`TestInterpreted`). TRITON_INTERPRET must be set
before triton itself is imported (triton.language's own functions, e.g. ``tl.sum``, are decorated then), so unless
this process already has it, :func:`test_interpreted_kernels_in_a_subprocess` runs that class in a child pytest
with ``TRITON_INTERPRET=1``. The CUDA test compares the compiled kernels on a GPU."""
import copy
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from regularizers import _perturb_triton  # noqa: E402
from regularizers._perturb import PerturbFunction  # noqa: E402

CL = torch.channels_last
# (shape, channels_last): an odd channel count, odd spatial sizes, a channels_last input, a 1x1 map
CASES = [((4, 3, 6, 6), False), ((3, 5, 7, 5), False), ((5, 8, 4, 4), True), ((2, 17, 1, 1), False)]
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True)
def _seeded(one_thread):
    torch.manual_seed(0)


def spy(monkeypatch):
    """Count the calls of the Triton path."""
    calls = []
    real = _perturb_triton.triton_forward
    monkeypatch.setattr(_perturb_triton, "triton_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def trio(num_sites=len(CASES), **kw):
    """(reference, PyTorch execution, Triton) PerturbFunctions with one random phi, frozen; phi's std 0.3 (not the
    init's 0.01) so that every convolution of the noise branch moves the output."""
    ref = PerturbFunction(num_sites=num_sites, impl="reference", **kw)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ref.phi_trainable = False
    pt, tr = copy.deepcopy(ref), copy.deepcopy(ref)
    pt.impl, pt.native = "fast", False
    tr.impl = "triton"
    return ref, pt, tr


def run(fns, h, g, **kw):
    """Outputs and gradients w.r.t. h of each function for the same h, eps and output gradient g."""
    outs, grads = [], []
    for fn in fns:
        x = h.clone().requires_grad_()
        o = fn(x, **kw)
        (o * g).sum().backward()
        outs.append(o)
        grads.append(x.grad)
    return outs, grads


def assert_all_close(outs, grads, tol):
    """The Triton path's (last) output and gradient equal the PyTorch execution's and the reference's."""
    for other in range(len(outs) - 1):
        torch.testing.assert_close(outs[-1], outs[other], **tol)
        torch.testing.assert_close(grads[-1], grads[other], **tol)


# ---- the kernels under triton's interpreter -------------------------------------------------------------------------

@pytest.mark.skipif(not _perturb_triton.INTERPRET,
                    reason="runs under TRITON_INTERPRET=1 in test_interpreted_kernels_in_a_subprocess")
class TestInterpreted:
    """The kernels on CPU tensors against the PyTorch execution and the reference: outputs and gradients w.r.t. h
    for the same eps, to 1e-5 (absolute and relative)."""

    def test_kernel_softplus_and_sigmoid_are_exact(self):
        t = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([0.0, -0.0, 16.5, -16.5, 88.0, 1e4, -1e4])])
        x = t.view(1, -1, 1, 1).contiguous(memory_format=CL)       # 4008 channels: tiles of one position
        ones = torch.ones_like(x)
        a = x.clone()
        z = _perturb_triton._noise_forward(ones, a, torch.zeros(1, 1, 1, 1), torch.zeros_like(x),
                                           torch.ones(x.shape[1]), 1.0, None, like=x)
        torch.testing.assert_close(z.flatten(), F.softplus(t), atol=2e-7, rtol=1e-6)    # (z - 1) + 1: absolute
        torch.testing.assert_close(a, x)                            # a now holds t = a + b + eps
        L = _perturb_triton._launch(x)
        dt, gm, mean = torch.empty_like(x), torch.empty_like(x), torch.empty(1, 1, 1, 1)
        part = torch.empty(L["grid"][0], L["C"])
        _perturb_triton._noise_bwd_kernel[L["grid"]](
            ones, ones, x, torch.full((L["C"],), 0.5), dt, gm, mean, part, L["N"], L["C"], L["HW"], L["W"],
            *ones.stride(), 0.8, 0.0, 1.0 / L["C"], HAS_CLIP=False, SCALE_GRAD=True, **L["blocks"])
        torch.testing.assert_close(dt.flatten(), 0.4 * torch.sigmoid(t), atol=1e-7, rtol=1e-6)   # g h c s sig(t)
        torch.testing.assert_close(gm.flatten(), (0.5 * F.softplus(t) - 1) * 0.8 + 1, atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(part.sum(0), F.softplus(t), atol=2e-7, rtol=1e-6)            # sum_p g h z
        neg = (t < 0) & (t > -80)                                   # softplus(t) ~ e^t: relatively exact too
        torch.testing.assert_close(part.sum(0)[neg], F.softplus(t)[neg], atol=0, rtol=1e-5)
        torch.testing.assert_close(mean.flatten(), dt.mean().view(1), atol=1e-6, rtol=1e-5)

    @pytest.mark.parametrize("mode", ["train", "eval"])
    @pytest.mark.parametrize("coeff", [1.0, 0.35])
    def test_triton_path_equals_pytorch_path_and_reference(self, monkeypatch, mode, coeff):
        calls = spy(monkeypatch)
        fns = trio()
        for fn in fns:
            fn.train(mode == "train")
        for site, (shape, cl) in enumerate(CASES):
            h = torch.randn(shape) * 2
            h = h.contiguous(memory_format=CL) if cl else h
            eps, g = torch.randn(shape), torch.randn(shape)
            outs, grads = run(fns, h, g, site=site, noise_coeff=coeff, eps=eps)
            assert_all_close(outs, grads, TOL)
            assert outs[2].stride() == h.stride() and grads[2].stride() == h.stride()    # h's layout is kept
            with torch.no_grad():                                   # no graph (MC evaluation): the same output
                torch.testing.assert_close(copy.deepcopy(fns[2])(h, site=site, noise_coeff=coeff, eps=eps),
                                           outs[0], **TOL)
        assert len(calls) == 2 * len(CASES)
        for k, v in fns[0].state_dict().items():                   # the running statistics agree
            torch.testing.assert_close(fns[2].state_dict()[k], v, atol=1e-6, rtol=1e-5)

    @pytest.mark.parametrize("cl", [False, True])
    def test_triton_path_when_clipping(self, cl):
        fns = trio(num_sites=1, clip=3.0)
        h = torch.randn(4, 6, 5, 5) * 4
        h = h.contiguous(memory_format=CL) if cl else h
        eps, g = torch.randn(4, 6, 5, 5) + 1.0, torch.randn(4, 6, 5, 5)
        outs, grads = run(fns, h, g, eps=eps)
        assert (outs[0] == 3.0).sum() > 5 and torch.equal(outs[2] == 3.0, outs[0] == 3.0)
        assert_all_close(outs, grads, TOL)
        x = h.clone().requires_grad_()
        fns[2](x, eps=eps).sum().backward()                         # sum's backward passes an expanded gradient
        torch.testing.assert_close(x.grad, run(fns[:1], h, torch.ones(h.shape), eps=eps)[1][0], **TOL)

    def test_noise_is_torch_sampler_draw(self):
        """Without eps the Triton path draws with PyTorch's sampler, in the same order: the PyTorch path's noise."""
        _, pt, tr = trio(num_sites=1)
        h = torch.randn(4, 3, 6, 6)
        torch.manual_seed(7)
        a = tr(h)
        torch.manual_seed(7)
        torch.testing.assert_close(a, pt(h), **TOL)
        assert not torch.allclose(tr(h), a)                         # fresh noise each call

    def test_deterministic_mode_and_trainable_phi_run_the_pytorch_execution(self, monkeypatch):
        ref, _, tr = trio(num_sites=1)
        monkeypatch.setattr(_perturb_triton, "triton_forward", lambda *a, **k: pytest.fail("the Triton path ran"))
        h, g = torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6)
        ref.deterministic = tr.deterministic = True
        outs, grads = run((ref, tr), h, g, noise_coeff=0.5)
        assert_all_close(outs, grads, TOL)
        with torch.no_grad():
            torch.testing.assert_close(tr(h, noise_coeff=0.5), outs[0], **TOL)
        ref.deterministic = tr.deterministic = False
        ref.phi_trainable = tr.phi_trainable = True
        eps = torch.randn_like(h)
        torch.testing.assert_close(tr(h, eps=eps), ref(h, eps=eps), **TOL)

    def test_forced_triton_refuses_float64(self):
        fn = PerturbFunction(impl="triton").double()
        fn.phi_trainable = False
        with pytest.raises(RuntimeError, match="float32 only"):
            fn(torch.randn(4, 3, 6, 6, dtype=torch.float64))


@pytest.mark.skipif(_perturb_triton.INTERPRET, reason="TRITON_INTERPRET is set: TestInterpreted runs in-process")
def test_interpreted_kernels_in_a_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::TestInterpreted"]
    p = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                       timeout=300)
    summary = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    ok = re.search(r"\b\d+ passed\b", summary) and not re.search(r"failed|error|skipped|deselected", summary)
    assert p.returncode == 0 and ok, p.stdout + p.stderr          # every interpreted test ran, and passed


# ---- dispatch -------------------------------------------------------------------------------------------------------

def test_dispatch_and_availability(monkeypatch, caplog):
    monkeypatch.setattr(_perturb_triton, "INTERPRET", False)
    monkeypatch.setattr(_perturb_triton, "_WARNED", [])
    h = torch.randn(4, 3, 6, 6)
    if not torch.cuda.is_available():
        assert not _perturb_triton.available() and "no CUDA device" in _perturb_triton.why_unavailable()
    assert not _perturb_triton.available() or "CUDA tensors only" in _perturb_triton.why_not(h)
    forced = PerturbFunction(impl="triton")
    forced.phi_trainable = False
    with pytest.raises(RuntimeError, match="impl='triton'"):
        forced(h)
    with caplog.at_level(logging.WARNING, logger=_perturb_triton.__name__):   # not forced: False, logged once
        assert not _perturb_triton.use(h, forced=False) and not _perturb_triton.use(h, forced=False)
    assert sum("Triton kernels do not run" in r.getMessage() for r in caplog.records) == 1
    with monkeypatch.context() as m:                  # under torch.compile: the PyTorch execution, even if forced
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not _perturb_triton.use(h, forced=True)
        assert forced(h).shape == h.shape
    # on the CPU the fast path never consults the Triton module (native C kernels or PyTorch)
    monkeypatch.setattr(_perturb_triton, "use", lambda *a, **k: pytest.fail("Triton consulted on the CPU"))
    fn = PerturbFunction()
    fn.phi_trainable = False
    for native in (True, False):
        fn.native = native
        assert fn(h).shape == h.shape
    with pytest.raises(ValueError, match="impl must be"):
        PerturbFunction(impl="cuda")


# ---- the compiled kernels on a GPU --------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_kernels_equal_pytorch_path(monkeypatch):
    """impl="fast" runs the compiled kernels on CUDA float32 tensors; they equal the PyTorch execution and the
    reference (to 1e-4: cuDNN may pick different algorithms for the two executions' convolutions)."""
    if _perturb_triton.INTERPRET or not _perturb_triton.available():
        pytest.skip(f"compiled Triton kernels unavailable ({_perturb_triton.why_unavailable() or 'interpreter'})")
    calls = spy(monkeypatch)
    ref, pt, tr = (fn.cuda() for fn in trio(num_sites=3, clip=3.0))
    tr.impl = "fast"
    shapes = [((3, 5, 7, 5), False), ((16, 64, 8, 8), True), ((8, 16, 16, 16), False)]
    for mode in (True, False):
        for fn in (ref, pt, tr):
            fn.train(mode)
        for site, (shape, cl) in enumerate(shapes):
            h = (torch.randn(shape) * 2).cuda()
            h = h.contiguous(memory_format=CL) if cl else h
            eps, g = torch.randn_like(h), torch.randn_like(h)
            outs, grads = run((ref, pt, tr), h, g, site=site, noise_coeff=0.6, eps=eps)
            assert_all_close(outs, grads, {"atol": 1e-4, "rtol": 1e-4})
            assert outs[2].stride() == h.stride() and grads[2].stride() == h.stride()
    assert len(calls) == 2 * len(shapes)
    torch.testing.assert_close(tr.running_var_1, ref.running_var_1)
    torch.manual_seed(5)
    a = tr(h, site=2)
    torch.manual_seed(5)
    torch.testing.assert_close(a, pt(h, site=2), atol=1e-4, rtol=1e-4)     # the same draw: torch's sampler


def test_bench_refuses_triton_where_it_cannot_run(cli, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: --impl triton runs")
    monkeypatch.setattr(_perturb_triton, "INTERPRET", False)
    code, _, err = cli("bench", "metaperturb", "--impl", "triton", "--steps", "1")
    assert code == 2 and "--impl triton" in err and "--device cuda" in err
